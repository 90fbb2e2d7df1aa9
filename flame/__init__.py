"""FLAME decoder, asset loaders and the open stand-in head model.

    from flame import FLAME, FaceCodes
    flame = FLAME.open_head()                      # open stand-in, generated and cached
    flame = FLAME.from_assets("path/to/flame_dir")  # real FLAME 2020 + DECA files
    out = flame(FaceCodes.zeros(1))                 # out.vertices, out.landmarks, ...
    flame.albedo(tex)                              # per-vertex albedo (open head: 50 components)
    bfm = BFM.from_file("BFM/BFM_model_front.mat")  # Basel Face Model, same call interface
"""
from flame.codes import FaceCodes, full_pose, relative_codes
from flame.bfm import BFM, BFMOutput, load_bfm_model
from flame.flame import FLAME, FlameOutput, lbs, rodrigues
from flame.loaders import (RestrictedUnpickler, load_flame_assets, load_flame_model,
                           load_landmark_embedding, load_obj, load_uv_mask, load_vertex_albedo)
from flame.open_head import default_cache_dir, ensure_open_head

__all__ = ["FaceCodes", "full_pose", "relative_codes", "FLAME", "FlameOutput", "lbs", "rodrigues",
           "BFM", "BFMOutput", "load_bfm_model",
           "RestrictedUnpickler", "load_flame_assets", "load_flame_model", "load_landmark_embedding",
           "load_obj", "load_uv_mask", "load_vertex_albedo", "default_cache_dir", "ensure_open_head"]
