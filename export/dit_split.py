"""Cut an exported DiT graph into the pieces step caching needs (DESIGN.md §9, fast_paths.md C.0/C.6).

    text_embed   encoder_hidden_states [B, 512, text_dim]      -> context_emb [B, 512, dim]   (once per prompt)
    time_embed   timestep [B] (TI2V [B, tokens] + hidden_states, read for its shape)
                                                                -> temb [B, dim], timestep_proj [B, 6*dim]
    patch_embed  hidden_states [B, C, F, H, W]                  -> tokens [B, L, dim], rope_cos/rope_sin [1, L, 1, d]
    block0       tokens, timestep_proj, context_emb, rope_*,    -> block_out [B, L, dim]       (First Block Cache)
                 hidden_states (shape only: batch and L)
    blocks_rest  the same, blocks 1..N-1                        -> block_out
    head         tokens (after the blocks), temb, hidden_states -> noise_pred (hidden_states: shape only)

The pieces are cut out of the monolithic graph `vidrt export` wrote, not traced again: every node
is the monolithic graph's node, so running the pieces in a chain computes exactly what the whole
graph computes, and every initializer keeps its name (a LoRA merge keyed on "model.<diffusers key>"
applies to the pieces unchanged). A graph whose weights live in an external data file is cut into
pieces that point at the same file (no second copy on disk).

The cut tensors are found from the exporter's module scopes (`pkg.torch.onnx.name_scopes`): the one
value each of `model.condition_embedder.text_embedder`, `.time_embedder`, `.time_proj` hands out,
the two `model.rope` hands out (cos/sin told apart by which table they come from), the tokens that
enter `model.blocks.0` from the patch embedding, and the residual stream leaving blocks 0 and N-1.
A graph where any of these is not found exactly once is refused (PackageError), never cut wrongly.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from vidrt.errors import PackageError
from vidrt.package import contracts as C
from vidrt.package.contracts import Contract, TensorSpec
from vidrt.package.registry import ModelSpec

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_BLOCK = re.compile(r"^model\.blocks\.(\d+)$")


class _Graph:
    """Who produces and who consumes each value, and each node's module scopes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        g = model.graph
        self.inits = {t.name for t in g.initializer}
        self.inputs = [v.name for v in g.input]
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.scopes: list[set[str]] = []
        for idx, node in enumerate(g.node):
            meta = {p.key: p.value for p in node.metadata_props}
            raw = meta.get(_SCOPES_KEY, "[]")
            self.scopes.append({s.strip(" '\"") for s in raw.strip("[]").split(",") if s.strip(" '\"")})
            for o in node.output:
                if o:
                    self.producer[o] = idx
            for i in node.input:
                if i:
                    self.consumers[i].append(idx)
        for idx, node in enumerate(g.node):  # nodes the optimiser made (casts) carry no scopes: they
            if not self.scopes[idx]:            # belong where the value they read was computed
                src = [self.producer[i] for i in node.input if i in self.producer]
                if src:
                    self.scopes[idx] = set(self.scopes[max(src)])
        self.block_of = [self._block(s) for s in self.scopes]
        self.num_blocks = 1 + max((b for b in self.block_of if b is not None), default=-1)

    @staticmethod
    def _block(scopes: set[str]) -> int | None:
        for s in scopes:
            m = _BLOCK.match(s)
            if m:
                return int(m.group(1))
        return None

    def handed_out(self, scope: str) -> list[str]:
        """Values produced inside `scope` and used by a node outside it (or a graph output)."""
        outs = {o.name for o in self.model.graph.output}
        found = []
        for idx, node in enumerate(self.model.graph.node):
            if scope not in self.scopes[idx]:
                continue
            for o in node.output:
                if o and (o in outs or any(scope not in self.scopes[c] for c in self.consumers[o])):
                    found.append(o)
        return found

    def depends_on(self, seeds: set[str]) -> set[str]:
        """Every value computed (transitively) from one of `seeds`."""
        reached = set(seeds)
        for node in self.model.graph.node:  # nodes are stored in topological order
            if any(i in reached for i in node.input if i):
                reached.update(o for o in node.output if o)
        return reached

    def needed_nodes(self, stops: set[str], outputs: list[str]) -> tuple[list[int], set[str]]:
        """Nodes that compute `outputs` from `stops`, and the graph inputs they read beyond those."""
        reached: set[int] = set()
        extra: set[str] = set()
        stack = list(outputs)
        while stack:
            name = stack.pop()
            if name in stops or name in self.inits:
                continue
            if name not in self.producer:
                extra.add(name)  # a graph input (read for its shape, e.g. hidden_states)
                continue
            idx = self.producer[name]
            if idx not in reached:
                reached.add(idx)
                stack.extend(i for i in self.model.graph.node[idx].input if i)
        return sorted(reached), extra


def _one(found: list[str], what: str, path: Path) -> str:
    if len(found) != 1:
        raise PackageError(f"{path.name}: cannot find the DiT's {what} ({len(found)} candidates); "
                           f"re-export the package with this vidrt (`vidrt export`)")
    return found[0]


def find_cuts(g: _Graph, path: Path) -> dict[str, str]:
    """Contract tensor name -> the value of the monolithic graph it is."""
    cuts = {C.CONTEXT_EMB: _one(g.handed_out("model.condition_embedder.text_embedder"), "text embedding", path),
            C.TEMB: _one(g.handed_out("model.condition_embedder.time_embedder"), "time embedding", path),
            C.TIMESTEP_PROJ: _one(g.handed_out("model.condition_embedder.time_proj"), "time projection", path)}
    rope = g.handed_out("model.rope")
    from_cos, from_sin = g.depends_on({"model.rope.freqs_cos"}), g.depends_on({"model.rope.freqs_sin"})
    cuts[C.ROPE_COS] = _one([r for r in rope if r in from_cos and r not in from_sin], "rope cos table", path)
    cuts[C.ROPE_SIN] = _one([r for r in rope if r in from_sin and r not in from_cos], "rope sin table", path)
    if g.num_blocks < 2:
        raise PackageError(f"{path.name}: a DiT with {g.num_blocks} block(s) has no block stack to cache")
    from_patch = g.depends_on({"model.patch_embedding.weight"})
    nodes = g.model.graph.node

    def entering(block: int, produced_by: int | None, weights: str | None) -> list[str]:
        """Values read by `block` (or the head when block is None) that `produced_by` computed."""
        from_weights = g.depends_on({w for w in g.inits if w.startswith(weights)}) if weights else from_patch
        found = []
        for idx, node in enumerate(nodes):
            if g.block_of[idx] != block:
                continue
            for i in node.input:
                p = g.producer.get(i)
                if p is not None and g.block_of[p] == produced_by and i in from_weights and i not in found:
                    found.append(i)
        return found

    last = g.num_blocks - 1
    cuts[C.TOKENS] = _one(entering(0, None, None), "patch-embedded tokens", path)
    # the residual stream is the value from block k that block k+1 (the head) reads AND that
    # depends on block k's own FFN weights (CSE'd shape/rope values computed in block k do not)
    cuts["block0_out"] = _one(entering(1, 0, "model.blocks.0.ffn."), "output of block 0", path)
    cuts["last_out"] = _one(entering(None, last, f"model.blocks.{last}.ffn."), f"output of block {last}", path)
    return cuts


def _value_info(name: str, spec: TensorSpec) -> onnx.ValueInfoProto:
    elem = onnx.TensorProto.BFLOAT16 if spec.dtype == "bfloat16" else helper.np_dtype_to_tensor_dtype(
        np.dtype(spec.dtype))
    return helper.make_tensor_value_info(name, elem, list(spec.shape))


def _dtype_of(model: onnx.ModelProto, value: str) -> str:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == value:
            t = vi.type.tensor_type.elem_type
            return "bfloat16" if t == onnx.TensorProto.BFLOAT16 else helper.tensor_dtype_to_np_dtype(t).name
    raise PackageError(f"the DiT graph has no type for {value}; re-export the package")


def split_contracts(spec: ModelSpec, dtypes: dict[str, str], whole: Contract) -> dict[str, Contract]:
    """The pieces' contracts (declared once, here; the runtime reads them from the manifest).
    `dtypes`: contract name -> numpy dtype name of that cut in the graph; `whole`: the monolithic
    contract, whose inputs the pieces read unchanged."""
    d, hd = spec.dit.dim, spec.dit.dim // spec.dit.num_heads
    per_token = spec.per_token_timestep
    t = ("batch", "tokens") if per_token else ("batch",)
    tokens = TensorSpec(C.TOKENS, dtypes[C.TOKENS], ("batch", "tokens", d))
    stream_in = (tokens, TensorSpec(C.TIMESTEP_PROJ, dtypes[C.TIMESTEP_PROJ], (*t, 6 * d)),
                 TensorSpec(C.CONTEXT_EMB, dtypes[C.CONTEXT_EMB], ("batch", spec.text.text_len, d)),
                 TensorSpec(C.ROPE_COS, dtypes[C.ROPE_COS], (1, "tokens", 1, hd)),
                 TensorSpec(C.ROPE_SIN, dtypes[C.ROPE_SIN], (1, "tokens", 1, hd)),
                 whole.input(C.LATENTS))  # read for its shape only (batch, tokens = F*H*W/4)
    stream_out = (TensorSpec(C.BLOCK_OUT, dtypes["block0_out"], ("batch", "tokens", d)),)
    return {
        C.TEXT_EMBED: Contract((whole.input(C.CONTEXT),), (stream_in[2],)),
        C.TIME_EMBED: Contract((whole.input(C.TIMESTEP),),
                               (TensorSpec(C.TEMB, dtypes[C.TEMB], (*t, d)), stream_in[1])),
        C.PATCH_EMBED: Contract((whole.input(C.LATENTS),), (tokens, stream_in[3], stream_in[4])),
        C.BLOCK0: Contract(stream_in, stream_out),
        C.BLOCKS_REST: Contract(stream_in, stream_out),
        C.HEAD: Contract((tokens, TensorSpec(C.TEMB, dtypes[C.TEMB], (*t, d)), whole.input(C.LATENTS)),
                         whole.outputs),
    }


def split_dit(path: Path | str, spec: ModelSpec, whole: Contract, expert: str) -> dict[str, tuple[Path, Contract]]:
    """Write the six pieces of the DiT graph at `path` beside it as `<expert>.<piece>.onnx`.
    Returns component name -> (file, contract). Raises PackageError for a graph it cannot cut."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    g = _Graph(model)
    cuts = find_cuts(g, path)
    dtypes = {name: _dtype_of(model, value) for name, value in cuts.items()}
    contracts = split_contracts(spec, dtypes, whole)
    x_in, x0, x_last = cuts[C.TOKENS], cuts["block0_out"], cuts["last_out"]
    side = {C.TIMESTEP_PROJ: cuts[C.TIMESTEP_PROJ], C.CONTEXT_EMB: cuts[C.CONTEXT_EMB],
            C.ROPE_COS: cuts[C.ROPE_COS], C.ROPE_SIN: cuts[C.ROPE_SIN]}
    # piece -> (contract input -> graph value, contract output -> graph value)
    wiring = {
        C.TEXT_EMBED: ({C.CONTEXT: C.CONTEXT}, {C.CONTEXT_EMB: cuts[C.CONTEXT_EMB]}),
        C.TIME_EMBED: ({C.TIMESTEP: C.TIMESTEP}, {C.TEMB: cuts[C.TEMB], C.TIMESTEP_PROJ: cuts[C.TIMESTEP_PROJ]}),
        C.PATCH_EMBED: ({C.LATENTS: C.LATENTS}, {C.TOKENS: x_in, C.ROPE_COS: cuts[C.ROPE_COS],
                                                 C.ROPE_SIN: cuts[C.ROPE_SIN]}),
        C.BLOCK0: ({C.TOKENS: x_in, **side, C.LATENTS: C.LATENTS}, {C.BLOCK_OUT: x0}),
        C.BLOCKS_REST: ({C.TOKENS: x0, **side, C.LATENTS: C.LATENTS}, {C.BLOCK_OUT: x_last}),
        C.HEAD: ({C.TOKENS: x_last, C.TEMB: cuts[C.TEMB], C.LATENTS: C.LATENTS}, {C.VELOCITY: C.VELOCITY}),
    }
    out: dict[str, tuple[Path, Contract]] = {}
    for piece, (ins, outs) in wiring.items():
        contract = contracts[piece]
        idx, extra = g.needed_nodes(set(ins.values()), list(outs.values()))
        unknown = extra - set(whole.input_names)
        if unknown:
            raise PackageError(f"{path.name}: the DiT's {piece} also reads {sorted(unknown)}; "
                               f"re-export the package with this vidrt (`vidrt export`)")
        if extra:  # a whole-graph input read for its shape (TI2V's time embedding: hidden_states)
            ins = {**ins, **{name: name for name in sorted(extra)}}
            contract = Contract(contract.inputs + tuple(whole.input(n) for n in sorted(extra)), contract.outputs)
        out[C.dit_piece(expert, piece)] = (_write_piece(model, g, idx, ins, outs, contract, path, expert, piece),
                                          contract)
    return out


def _write_piece(model: onnx.ModelProto, g: _Graph, idx: list[int], ins: dict[str, str], outs: dict[str, str],
                 contract: Contract, path: Path, expert: str, piece: str) -> Path:
    """One piece as its own graph: the monolithic graph's nodes `idx`, with the cut values renamed to
    the contract's names; initializers (and external-data references) copied as they are."""
    rename = {v: k for k, v in ins.items()} | {v: k for k, v in outs.items()}
    nodes = []
    for i in idx:
        node = onnx.NodeProto()
        node.CopyFrom(model.graph.node[i])
        for j, name in enumerate(node.input):
            if name in rename:
                node.input[j] = rename[name]
        for j, name in enumerate(node.output):
            if name in rename:
                node.output[j] = rename[name]
        nodes.append(node)
    used = {i for n in nodes for i in n.input}
    inits = [t for t in model.graph.initializer if t.name in used]
    specs = {t.name: t for t in contract.inputs + contract.outputs}
    graph = helper.make_graph(nodes, f"{expert}.{piece}", [_value_info(n, specs[n]) for n in contract.input_names],
                              [_value_info(n, specs[n]) for n in contract.output_names], initializer=inits)
    piece_model = helper.make_model(graph, opset_imports=list(model.opset_import), functions=list(model.functions),
                                    producer_name="vidrt.export.dit_split")
    piece_model.ir_version = model.ir_version
    target = path.with_name(f"{C.dit_piece(expert, piece)}.onnx")
    tmp = target.with_name(f".{target.name}.tmp")
    onnx.save(piece_model, str(tmp))
    tmp.replace(target)
    return target


__all__ = ["split_dit", "split_contracts", "find_cuts"]
