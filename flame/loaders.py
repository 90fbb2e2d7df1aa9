"""Readers (and writers) of the FLAME asset files, without chumpy and without arbitrary pickles.

A FLAME asset folder holds the files DECA's ``data/`` folder has (the open head model writes the
same files, see ``flame.open_head``):

=========================  ================================================================
``generic_model.pkl``      FLAME 2020 model: v_template, shapedirs, posedirs, J_regressor,
                           kintree_table, weights, f (a Python 2 pickle holding chumpy arrays)
``landmark_embedding.npy`` DECA's 68-landmark embedding (static 51 + dynamic 17 contour)
``head_template.obj``      the FLAME mesh with its UV layout (vt / ft)
``uv_face_mask.png``       UV-space mask of the face, eyes and mouth excluded (SAFA sec. 3.2)
``uv_face_eye_mask.png``   UV-space mask of the face including the eyes (optional)
``vertex_albedo.npz``      per-vertex albedo model (optional): ``mean`` V x 3 and ``basis``
                           V x 3 x n_tex in linear RGB [0, 1], ``names`` (n_tex strings). The
                           open head writes one; FLAME 2020 has none (see ``missing_albedo_error``)
=========================  ================================================================

The FLAME model needs a (free, non-commercial) registration at https://flame.is.tue.mpg.de; the
other files come with DECA. Pickles are read by :class:`RestrictedUnpickler`, which rebuilds
numpy arrays, scipy sparse matrices and (for the landmark file) torch tensors, turns chumpy
objects into numpy arrays, and refuses every other class before anything is executed.
"""
import _compat_pickle
import collections
import io
import os
import pickle
import warnings

import numpy as np
import scipy.sparse

FLAME_REGISTRATION = "https://flame.is.tue.mpg.de"
ASSET_FILES = {
    "model": "generic_model.pkl",
    "landmarks": "landmark_embedding.npy",
    "template": "head_template.obj",
    "face_mask": "uv_face_mask.png",
    "face_eye_mask": "uv_face_eye_mask.png",
    "albedo": "vertex_albedo.npz",
}
ASSET_DESCRIPTIONS = {
    "model": "the FLAME 2020 model (generic_model.pkl)",
    "landmarks": "DECA's 68-landmark embedding (landmark_embedding.npy)",
    "template": "the FLAME head template with UVs (head_template.obj, from DECA)",
    "face_mask": "the UV face mask without eyes and mouth (uv_face_mask.png, from DECA)",
    "face_eye_mask": "the UV face mask with eyes (uv_face_eye_mask.png, from DECA)",
    "albedo": "a per-vertex albedo model (vertex_albedo.npz: mean V x 3, basis V x 3 x n_tex)",
}


def missing_asset_error(path, kind):
    what = ASSET_DESCRIPTIONS.get(kind, kind)
    return FileNotFoundError(
        f"{path}: file not found. It should hold {what}. FLAME needs a free registration at "
        f"{FLAME_REGISTRATION} (download FLAME 2020 and put generic_model.pkl there); DECA's "
        "data folder has the landmark embedding, head template and UV masks. Without them, use "
        "the open stand-in head model (flame.open_head / FLAME.open_head()).")


def _require_file(path, kind):
    if not os.path.isfile(path):
        raise missing_asset_error(path, kind)


# ----------------------------------------------------------------------------- restricted pickle
class _StandIn:
    """Inert record of a pickled object of a foreign class: it stores its state and nothing else."""
    source_class = "?"
    state = {}

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}


class _ChumpyStandIn(_StandIn):
    """Replaces any chumpy class; ``chumpy_to_numpy`` evaluates the terminal and reordering nodes."""


class _SparseStandIn(_StandIn):
    """Replaces a scipy.sparse matrix class; rebuilt from its arrays, never from its pickled type."""


class RefusedPickleError(pickle.UnpicklingError, ValueError):
    """A pickle asks for something the restricted loader does not build (it could run code).

    A ``ValueError`` too, so the command line reports it as a message, not a traceback."""


def _stand_in_class(base, module, name):
    key = (base, module, name)
    if key not in _STAND_IN_CACHE:
        _STAND_IN_CACHE[key] = type(name, (base,), {"source_class": f"{module}.{name}"})
    return _STAND_IN_CACHE[key]


_STAND_IN_CACHE = {}


def _safe_reconstructor(cls, base, state):
    """Protocol 0/1 form of object creation, limited to our inert stand-ins."""
    if not (isinstance(cls, type) and issubclass(cls, _StandIn)):
        raise RefusedPickleError(f"refusing copyreg._reconstructor for {cls!r}")
    return cls.__new__(cls)


def _latin1_bytes(text, encoding="latin1"):
    """How Python 3 writes bytes in a protocol-2 pickle: _codecs.encode(text, 'latin1')."""
    if encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise RefusedPickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _safe_storage_from_bytes(data):
    """torch's pickled storages are a nested torch.save; read it with the weights-only loader."""
    import torch
    return torch.load(io.BytesIO(data), weights_only=True)


def _numpy_allowed():
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed = {}
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


_SAFE_BUILTINS = {("builtins", n): getattr(__import__("builtins"), n)
                  for n in ("set", "frozenset", "slice", "complex", "bytearray", "object")}
_SPARSE_NAMES = {"csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array"}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for FLAME/DECA asset files.

    Allowed: numpy array/dtype/scalar reconstruction, a few inert builtins (set, slice, ...), scipy
    sparse matrices (rebuilt from their arrays), chumpy classes (mapped to an inert stand-in turned
    into numpy afterwards) and, with ``allow_torch``, torch's tensor rebuild function, its storage
    loader (weights-only) and ``collections.OrderedDict``. Everything else raises
    ``pickle.UnpicklingError`` naming the class, before any of it runs.
    """

    def __init__(self, file, allow_torch=False, source="pickle"):
        super().__init__(file, encoding="latin1")
        self.allow_torch = allow_torch
        self.source = source
        self.allowed = dict(_numpy_allowed())
        self.allowed.update(_SAFE_BUILTINS)
        self.allowed[("copyreg", "_reconstructor")] = _safe_reconstructor
        self.allowed[("_codecs", "encode")] = _latin1_bytes
        if allow_torch:
            import torch._utils
            self.allowed[("torch._utils", "_rebuild_tensor_v2")] = torch._utils._rebuild_tensor_v2
            self.allowed[("torch.storage", "_load_from_bytes")] = _safe_storage_from_bytes
            self.allowed[("collections", "OrderedDict")] = collections.OrderedDict

    def find_class(self, module, name):
        # Python 2 names (FLAME's pickle: __builtin__.set, copy_reg._reconstructor), as pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "chumpy" or module.startswith("chumpy."):
            return _stand_in_class(_ChumpyStandIn, module, name)
        if module.startswith("scipy.sparse") and name in _SPARSE_NAMES:
            return _stand_in_class(_SparseStandIn, module, name)
        raise RefusedPickleError(
            f"{self.source}: refused to load it: it asks to build {module}.{name}, and a pickle "
            "that builds arbitrary objects can run code. FLAME asset files hold only numpy arrays, "
            "scipy sparse matrices, chumpy arrays" + (" and torch tensors" if self.allow_torch
                                                      else "")
            + "; nothing of the file was run. Use the file as its authors publish it, or re-save "
            "its arrays as plain numpy (flame/loaders.py save_flame_model)")

    def persistent_load(self, pid):
        raise RefusedPickleError(f"{self.source}: refused to load it: persistent id {pid!r} "
                                 "(FLAME asset files have none); nothing of the file was run")

    def load(self):
        """Unpickle; a refusal names the file and why, and a corrupt or truncated file becomes
        a ``ValueError`` naming it."""
        try:
            return super().load()
        except RefusedPickleError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError,
                KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{self.source}: cannot read it as a pickle ({error}); the file is "
                             "truncated, corrupt or not a FLAME/DECA asset") from None


def _sparse_from_stand_in(obj):
    st = obj.state
    fmt = obj.source_class.rsplit(".", 1)[-1][:3]
    shape = tuple(st.get("_shape", st.get("shape")))
    if fmt in ("csc", "csr"):
        cls = scipy.sparse.csc_matrix if fmt == "csc" else scipy.sparse.csr_matrix
        return cls((np.asarray(st["data"]), np.asarray(st["indices"]), np.asarray(st["indptr"])),
                   shape=shape)
    row, col = st["coords"] if "coords" in st else (st["row"], st["col"])
    return scipy.sparse.coo_matrix((np.asarray(st["data"]), (row, col)), shape=shape)


def chumpy_to_numpy(obj):
    """Evaluate a chumpy stand-in: terminal ``Ch`` arrays and the pure reordering nodes."""
    st, name = obj.state, obj.source_class.rsplit(".", 1)[-1]
    if name == "Reshape":
        return to_plain(st["a"]).reshape(st["newshape"])
    if name == "transpose":
        return np.transpose(to_plain(st["a"]), axes=st.get("axes"))
    if name == "Select":
        out = to_plain(st["a"]).ravel()[np.asarray(st["idxs"])]
        return out.reshape(st["preferred_shape"]) if "preferred_shape" in st else out
    if name == "Concatenate":
        terms = sorted((k for k in st if k.startswith("m") and k[1:].isdigit()),
                       key=lambda k: int(k[1:]))
        return np.concatenate([to_plain(st[k]) for k in terms], axis=st.get("axis", 0))
    if "x" in st:
        return np.asarray(to_plain(st["x"]))
    raise pickle.UnpicklingError(f"chumpy object {obj.source_class} (state keys {sorted(st)}) has "
                                 "no array value this loader can evaluate")


def to_plain(obj):
    """Replace stand-ins (recursively in dicts, lists, tuples) by numpy / scipy objects."""
    if isinstance(obj, _ChumpyStandIn):
        return chumpy_to_numpy(obj)
    if isinstance(obj, _SparseStandIn):
        return _sparse_from_stand_in(obj)
    if isinstance(obj, _StandIn):
        raise pickle.UnpicklingError(f"unexpected object {obj.source_class}")
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        flat = [to_plain(v) for v in obj.ravel()]
        if obj.ndim == 0:
            return flat[0]
        out = np.empty(obj.shape, dtype=object)
        out.ravel()[:] = flat
        return out
    return obj


def restricted_loads(data, allow_torch=False, source="pickle"):
    return to_plain(RestrictedUnpickler(io.BytesIO(data), allow_torch, source).load())


def restricted_load(path, allow_torch=False):
    with open(path, "rb") as f:
        return to_plain(RestrictedUnpickler(f, allow_torch, source=str(path)).load())


# ----------------------------------------------------------------------------- FLAME model
FLAME_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "f")


def load_flame_model(path):
    """The FLAME model pickle as a dict of numpy arrays (J_regressor stays scipy sparse if it is).

    Works for FLAME 2020 ``generic_model.pkl`` (chumpy inside, Python 2 pickle) and for the open
    head model, which is written in the same layout.
    """
    path = os.fspath(path)
    _require_file(path, "model")
    with open(path, "rb") as f:
        raw = RestrictedUnpickler(f, source=path).load()
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a FLAME model pickle holds a dict, found {type(raw).__name__}")
    missing = [k for k in FLAME_KEYS if k not in raw]
    if missing:
        raise ValueError(f"{path}: not a FLAME model, keys {missing} are missing")
    model = {}
    for key, value in raw.items():
        try:
            model[key] = to_plain(value)
        except pickle.UnpicklingError as err:      # an extra entry we cannot evaluate: skip it
            if key in FLAME_KEYS:
                raise
            warnings.warn(f"{path}: skipping entry {key!r} ({err})")
    return model


def save_flame_model(path, model):
    """Write ``model`` (dict of numpy arrays / scipy sparse) as a FLAME-layout pickle."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump(model, f, protocol=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- landmark embedding
LANDMARK_KEYS = ("static_lmk_faces_idx", "static_lmk_bary_coords", "dynamic_lmk_faces_idx",
                 "dynamic_lmk_bary_coords", "full_lmk_faces_idx", "full_lmk_bary_coords")


def read_npy(path, allow_torch=False):
    """``np.load`` for .npy files, with object arrays read through :class:`RestrictedUnpickler`."""
    from numpy.lib import format as npy_format
    with open(path, "rb") as f:
        version = npy_format.read_magic(f)
        reader = (npy_format.read_array_header_1_0 if version == (1, 0)
                  else npy_format.read_array_header_2_0)
        _, _, dtype = reader(f)
        if dtype != object:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        return to_plain(RestrictedUnpickler(f, allow_torch=allow_torch, source=str(path)).load())


def _as_numpy(value):
    if hasattr(value, "detach"):  # torch tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def load_landmark_embedding(path):
    """DECA's ``landmark_embedding.npy`` as a dict of numpy arrays (torch tensors converted)."""
    path = os.fspath(path)
    _require_file(path, "landmarks")
    data = read_npy(path, allow_torch=True)
    if isinstance(data, np.ndarray) and data.dtype == object:
        data = data.item()
    missing = [k for k in LANDMARK_KEYS if k not in data]
    if missing:
        raise ValueError(f"{path}: not a DECA landmark embedding, keys {missing} are missing")
    return {k: _as_numpy(data[k]) for k in LANDMARK_KEYS}


def save_landmark_embedding(path, embedding):
    """Write in DECA's format: a pickled dict whose dynamic entries are torch tensors."""
    import torch
    out = {}
    for key in LANDMARK_KEYS:
        value = np.asarray(embedding[key])
        out[key] = torch.from_numpy(value.copy()) if key.startswith("dynamic") else value
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, np.array(out, dtype=object), allow_pickle=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- OBJ and masks
def load_obj(path):
    """Vertices, faces and UVs of an OBJ file: dict(v (N,3), f (F,3), vt (M,2), ft (F,3)), 0-based."""
    path = os.fspath(path)
    _require_file(path, "template")
    verts, uvs, faces, face_uvs = [], [], [], []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "v":
                verts.append([float(x) for x in parts[1:4]])
            elif parts[0] == "vt":
                uvs.append([float(x) for x in parts[1:3]])
            elif parts[0] == "f":
                corners = [p.split("/") for p in parts[1:]]
                for k in range(1, len(corners) - 1):  # fan-triangulate polygons
                    tri = (corners[0], corners[k], corners[k + 1])
                    faces.append([int(c[0]) - 1 for c in tri])
                    if all(len(c) > 1 and c[1] for c in tri):
                        face_uvs.append([int(c[1]) - 1 for c in tri])
    out = {"v": np.array(verts, np.float32).reshape(-1, 3),
           "f": np.array(faces, np.int64).reshape(-1, 3),
           "vt": np.array(uvs, np.float32).reshape(-1, 2),
           "ft": np.array(face_uvs, np.int64).reshape(-1, 3)}
    if len(out["ft"]) and len(out["ft"]) != len(out["f"]):
        raise ValueError(f"{path}: some faces have UV indices and some do not")
    return out


def save_obj(path, v, f, vt=None, ft=None):
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in np.asarray(v)]
    if vt is not None:
        lines += [f"vt {a:.6f} {b:.6f}" for a, b in np.asarray(vt)]
        lines += [f"f {a+1}/{ta+1} {b+1}/{tb+1} {c+1}/{tc+1}"
                  for (a, b, c), (ta, tb, tc) in zip(np.asarray(f), np.asarray(ft))]
    else:
        lines += [f"f {a+1} {b+1} {c+1}" for a, b, c in np.asarray(f)]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def load_uv_mask(path, kind="face_mask"):
    """A UV-space mask image as float32 H x W in [0, 1] (row 0 is v = 1, as DECA's masks)."""
    import imageio.v2 as imageio
    path = os.fspath(path)
    _require_file(path, kind)
    image = np.asarray(imageio.imread(path)).astype(np.float32)
    if image.ndim == 3:
        image = image[..., :3].mean(-1)
    return image / (255.0 if image.max() > 1.0 else 1.0)


def save_uv_mask(path, mask):
    import imageio.v2 as imageio
    tmp = f"{path}.tmp{os.getpid()}.png"
    imageio.imwrite(tmp, (np.clip(mask, 0, 1) * 255).round().astype(np.uint8))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- per-vertex albedo
ALBEDO_KEYS = ("mean", "basis")


def missing_albedo_error(path):
    return FileNotFoundError(
        f"{path}: no per-vertex albedo model. FLAME 2020 (generic_model.pkl) has no albedo; its "
        f"texture spaces (FLAME_texture.npz from {FLAME_REGISTRATION}, or DECA's "
        "FLAME_albedo_from_BFM.npz) are UV images, which this project does not read. Put a "
        f"per-vertex model at that path ({ASSET_DESCRIPTIONS['albedo']}, colors in [0, 1], e.g. "
        "a UV texture space sampled at the vertex UVs), or use the open head "
        "(FLAME.open_head(), which has one) or the Basel Face Model (flame.bfm.BFM).")


def load_vertex_albedo(path):
    """``vertex_albedo.npz`` as dict(mean V x 3, basis V x 3 x n, names list) (no pickles)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise missing_albedo_error(path)
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ALBEDO_KEYS if k not in data]
        if missing:
            raise ValueError(f"{path}: not a per-vertex albedo model, arrays {missing} are missing")
        mean, basis = np.asarray(data["mean"]), np.asarray(data["basis"])
        names = [str(n) for n in data["names"]] if "names" in data else []
    if mean.ndim != 2 or mean.shape[1] != 3 or basis.shape[:2] != mean.shape or basis.ndim != 3:
        raise ValueError(f"{path}: albedo mean must be V x 3 and basis V x 3 x n, got "
                         f"{mean.shape} and {basis.shape}")
    return {"mean": mean, "basis": basis, "names": names}


def save_vertex_albedo(path, albedo):
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, mean=np.asarray(albedo["mean"], np.float32),
             basis=np.asarray(albedo["basis"], np.float32),
             names=np.asarray(albedo.get("names", []), dtype=str))
    os.replace(tmp, path)


def asset_paths(folder, **overrides):
    """Paths of the asset files in ``folder`` (each may be overridden by a full path)."""
    paths = {k: os.path.join(os.fspath(folder), v) for k, v in ASSET_FILES.items()}
    paths.update({k: os.fspath(v) for k, v in overrides.items() if v is not None})
    return paths


def load_flame_assets(folder=None, model_path=None, landmark_path=None, template_path=None,
                      face_mask_path=None, albedo_path=None):
    """Everything the decoder and renderer need from one asset folder (or explicit paths).

    Returns dict(model, landmarks, template (or None), face_mask (or None), albedo (or None)).
    The model and the landmark embedding are required; the template (UVs) and the face mask are
    needed only for UV-space work (SAFA's face mask) and the per-vertex albedo only for shaded
    renders; they are returned as None when absent.
    """
    if folder is None and model_path is None:
        raise ValueError("give the FLAME asset folder or the path of generic_model.pkl")
    base = folder if folder is not None else os.path.dirname(os.fspath(model_path))
    paths = asset_paths(base, model=model_path, landmarks=landmark_path, template=template_path,
                        face_mask=face_mask_path, albedo=albedo_path)
    return {
        "model": load_flame_model(paths["model"]),
        "landmarks": load_landmark_embedding(paths["landmarks"]),
        "template": load_obj(paths["template"]) if os.path.isfile(paths["template"]) else None,
        "face_mask": load_uv_mask(paths["face_mask"]) if os.path.isfile(paths["face_mask"]) else None,
        "albedo": load_vertex_albedo(paths["albedo"]) if os.path.isfile(paths["albedo"]) else None,
        "paths": paths,
    }
