"""Published step-cache constants for Wan, as data (fast_paths.md part C, each with its source).

TeaCache: polynomial coefficients (numpy.poly1d order, highest power first) that rescale the
relative L1 change of the timestep embedding into an estimate of the model output's change;
`e` = the time embedding (use_ret_steps=False), `e0` = the time projection (use_ret_steps=True).
ali-vilab/TeaCache TeaCache4Wan2.1/teacache_generate.py (fast_paths.md C.1 table).

MagCache: mean over tokens of ||R_t|| / ||R_{t-1}|| of the block-stack residual R, per DiT call,
cond/uncond interleaved, with the reference's [1.0, 1.0] pad for the first step (50 steps).
Zehong-Ma/MagCache MagCache4Wan2.1/magcache_generate.py t2v tables (fast_paths.md C.2 table).
"""

from __future__ import annotations

TEACACHE_COEFFICIENTS: dict[str, dict[str, tuple[float, ...]]] = {
    "wan2.1-t2v-1.3b": {
        "e": (2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01),
        "e0": (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    },
    "wan2.1-t2v-14b": {
        "e": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
        "e0": (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
    },
    "wan2.2-ti2v-5b": {  # LightX2V configs/caching/teacache/wan_ti2v_tea_720p.json (input e)
        "e": (1.57472669e+05, -1.15702395e+05, 3.10761669e+04, -3.83116651e+03, 2.21608777e+02, -4.81179567e+00),
    },
}

# TeaCache README thresholds (fast_paths.md C.1): 1.3B 0.08 (e), 14B 0.2; MagCache defaults (C.2).
TEACACHE_DEFAULT_THRESHOLD = {"wan2.1-t2v-1.3b": 0.08, "wan2.1-t2v-14b": 0.2, "wan2.2-ti2v-5b": 0.26}

MAGCACHE_RATIOS: dict[str, tuple[float, ...]] = {
    "wan2.1-t2v-14b": (1.0, 1.0, 1.02504, 1.03017, 1.00025, 1.00251, 0.9985, 0.99962, 0.99779, 0.99771, 0.9966,
                       0.99658, 0.99482, 0.99476, 0.99467, 0.99451, 0.99664, 0.99656, 0.99434, 0.99431, 0.99533,
                       0.99545, 0.99468, 0.99465, 0.99438, 0.99434, 0.99516, 0.99517, 0.99384, 0.9938, 0.99404,
                       0.99401, 0.99517, 0.99516, 0.99409, 0.99408, 0.99428, 0.99426, 0.99347, 0.99343, 0.99418,
                       0.99416, 0.99271, 0.99269, 0.99313, 0.99311, 0.99215, 0.99215, 0.99218, 0.99215, 0.99216,
                       0.99217, 0.99163, 0.99161, 0.99138, 0.99135, 0.98982, 0.9898, 0.98996, 0.98995, 0.9887,
                       0.98866, 0.98772, 0.9877, 0.98767, 0.98765, 0.98573, 0.9857, 0.98501, 0.98498, 0.9838,
                       0.98376, 0.98177, 0.98173, 0.98037, 0.98035, 0.97678, 0.97677, 0.97546, 0.97543, 0.97184,
                       0.97183, 0.96711, 0.96708, 0.96349, 0.96345, 0.95629, 0.95625, 0.94926, 0.94929, 0.93964,
                       0.93961, 0.92511, 0.92504, 0.90693, 0.90678, 0.8796, 0.87945, 0.86111, 0.86189),
    "wan2.1-t2v-1.3b": (1.0, 1.0, 1.0124, 1.02213, 1.00166, 1.0041, 0.99791, 1.00061, 0.99682, 0.99762, 0.99634,
                        0.99685, 0.99567, 0.99586, 0.99416, 0.99422, 0.99578, 0.99575, 0.9957, 0.99563, 0.99511,
                        0.99506, 0.99535, 0.99531, 0.99552, 0.99549, 0.99541, 0.99539, 0.9954, 0.99536, 0.99489,
                        0.99485, 0.99518, 0.99514, 0.99484, 0.99478, 0.99481, 0.99479, 0.99415, 0.99413, 0.99419,
                        0.99416, 0.99396, 0.99393, 0.99388, 0.99386, 0.99349, 0.99349, 0.99309, 0.99304, 0.9927,
                        0.9927, 0.99228, 0.99226, 0.99171, 0.9917, 0.99137, 0.99135, 0.99068, 0.99063, 0.99005,
                        0.99003, 0.98944, 0.98942, 0.98849, 0.98849, 0.98758, 0.98757, 0.98644, 0.98643, 0.98504,
                        0.98503, 0.9836, 0.98359, 0.98202, 0.98201, 0.97977, 0.97978, 0.97717, 0.97718, 0.9741,
                        0.97411, 0.97003, 0.97002, 0.96538, 0.96541, 0.9593, 0.95933, 0.95086, 0.95089, 0.94013,
                        0.94019, 0.92402, 0.92414, 0.90241, 0.9026, 0.86821, 0.86868, 0.81838, 0.81939),
}

# (threshold, K, retention ratio): MagCache4Wan2.1 argparse defaults (L746-760); E012K2R02.
MAGCACHE_DEFAULTS = (0.12, 2, 0.2)
# FBCache: LightX2V Wan2.1 1.3B residual_diff_threshold (fast_paths.md C.4); diffusers' default is 0.05.
FBCACHE_DEFAULT_THRESHOLD = 0.05
# EasyCache: --thresh 0.05, first 10 steps and the last one always computed (fast_paths.md C.3).
EASYCACHE_DEFAULT_THRESHOLD = 0.05
EASYCACHE_RET_STEPS = 10
# TeaCache use_ret_steps=True forces the first 5 steps (C.1).
TEACACHE_RET_STEPS = 5
