"""Graph clean-up after tracing: what torch's `ONNXProgram.optimize()` does (onnxscript's
`optimize_ir`, then its ONNX fusions), minus rewrite rules whose matcher is quadratic in graph size.

Why: onnxscript's multi-output-node rules (today only `SlicesSplit`, two Slices -> one Split) are
matched by listing every node of the graph for every candidate node (onnxscript 0.7,
`rewriter/_matcher.py`, "potentially expensive"). On the 30-block Wan2.1-1.3B DiT (~15k nodes) that
one rule was 329 of the export's 480 s on 2 cores; on a 40-block 14B DiT it grows with the square.
It does not fire on the Wan graphs: `tests/test_export.py` checks that this function gives the same
graph as torch's own `optimize()` on the tiny DiT, umT5 and VAE graphs, so a change in onnxscript
that breaks the equivalence is caught there.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding
from onnxscript.rewriter import onnx_fusions


def cheap_rules() -> list[Any]:
    """onnxscript's default rewrite rules that match one output node (linear-time matching)."""
    return [r for r in rewriter._DEFAULT_REWRITE_RULES if r._target_pattern.has_single_output_node]


def optimize_model(model: ir.Model, num_iterations: int = 2, dedupe_initializers: bool = True) -> None:
    """In place: inline, fold constants + rewrite (to a fixed point, at most `num_iterations`), drop
    unused nodes/functions/opsets, lift constants, dedupe initializers, CSE, name fixes, ONNX fusions
    (the pass list of onnxscript.optimizer.optimize_ir with `cheap_rules()`).

    dedupe_initializers=False keeps one initializer per model parameter even where two hold the same
    values (DeduplicateInitializersPass would give both modules one shared tensor): a LoRA merged by
    initializer name must change one module's weight, not every module whose weights happened to be
    equal (the bundled model's zero, frozen text-path biases were ten modules on one initializer)."""
    loop = ir.passes.PassManager(
        [_constant_folding.FoldConstantsPass(
            shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            should_fold=lambda node: None),
         rewriter.RewritePass(cheap_rules()),
         common_passes.RemoveUnusedNodesPass(), common_passes.RemoveUnusedFunctionsPass(),
         common_passes.RemoveUnusedOpsetsPass()],
        steps=num_iterations, early_stop=True)
    passes = ir.passes.Sequential(
        common_passes.InlinePass(), loop, common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        *([common_passes.DeduplicateInitializersPass()] if dedupe_initializers else []),
        common_passes.CommonSubexpressionEliminationPass(), common_passes.OutputFixPass(),
        common_passes.NameFixPass())
    passes(model)
    onnx_fusions.fuse(model)
