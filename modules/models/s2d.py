"""Sparse-to-dense motion transfer (Zhao, Wu and Guo, "Sparse to Dense Motion Transfer for Face
Image Animation"): a face image animated by a sequence of sparse face landmarks.

Networks (docs/landmarks_and_s2d.md):

* dense motion (``modules/s2d_motion.py``): the global branch M_G (an encoder-decoder over the
  source, AdaIN(S_lm) in the encoder, AdaIN(D_lm) in the decoder, Add_Motion layers injecting
  FC(D_lm - S_lm)) and three local branches M_L1..M_L3 (left eye + brow, right eye + brow,
  mouth) on patches around their regions, fused by eq. 3 into the dense motion F;
* image generation (``modules/s2d_generator.py``): FOMM's occlusion-aware generator on the warped
  source E = f_w^b(S_I, F) (eq. 1) concatenated with F (Table 1's model; Table 4 feeds E only:
  ``s2d_params.use_motion_input``), giving a residual R and a mask M, T = E (1 - M) + R M (eq. 2).

Losses (eq. 8): the VGG-19 perceptual pyramid (eq. 4, FOMM's form), L1, LSGAN (eqs. 5-6) and the
optional parsing loss (eq. 7: the source's parsing map warped by F with nearest sampling against
the driving frame's map; ``.parsing.npy`` sidecars). Table 4's switches: ``s2d_params``.

Landmarks: ``model_params.num_landmarks`` points (74: iBUG 68 + lids + pupils, the paper's; 68 for
FAN/dlib sidecars), normalized. Training takes them from the landmark sidecars (74-point files
serve a 68-point model too). For animation, ``encode_driving`` takes ``B x N x 2`` landmarks (or
frames, whose landmarks are then detected), and ``encode_source(source, landmarks=None)`` detects
the source's landmarks unless given, with ``model_params.source_landmarks``: the trained
``landmarks`` model checkpoint it names, else the first backend that loads (FAN, then dlib; 68
points). Use the detector that made the training sidecars.

Choices where the paper is silent:

* Loss weights: the perceptual pyramid keeps FOMM's per-layer weight 10 (the paper follows FOMM
  for it); eq. 8 adds its terms with equal weight, so L1 and the parsing term get that same
  weight 10 (parsing off by default: it needs parsing maps), the LSGAN generator term FOMM's 1.
  The paper names no feature-matching term: its weights are 0.
* The discriminator is FOMM's patch discriminator on the image alone (no keypoint heatmaps).
* Pairs whose frames lack a landmark (NaN rows in a sidecar: no face found) are left out of the
  batch; a batch with no usable pair is an error naming the videos.
"""
import torch

from modules.discriminator import MultiScaleDiscriminator
from modules.face_parsing import parsing_loss
from modules.landmark_layout import LAYOUTS, NUM_IBUG, check_layout, ibug68
from modules.landmark_sources import LANDMARKER_CHOICES, load_landmarker
from modules.model_base import AnimationModel
from modules.objectives import OBJECTIVE_TRAIN_PARAMS, AdversarialObjective, PerceptualPyramid
from modules.registry import register_model
from modules.s2d_generator import ResidualMaskGenerator
from modules.s2d_motion import REGION_ORDER, SparseToDenseMotion
from modules.util import draw_keypoints, flow_to_color, gray_to_rgb, keypoint_hull_area, \
    relative_keypoints

S2D_LOSS_WEIGHTS = {
    "perceptual": [10.0, 10.0, 10.0, 10.0, 10.0],   # relu1_1 .. relu5_1, eq. 4
    "l1": 10.0,                                      # eq. 8's L_1
    "generator_gan": 1.0,                            # eq. 6 (LSGAN); 0 turns the GAN off
    "discriminator_gan": 1.0,                        # eq. 5
    "feature_matching": [0.0, 0.0, 0.0, 0.0],
    "parsing": 0.0,                                  # eq. 7; needs dataset_params.load_parsing
}
SHARED_TRAIN_PARAMS = ("scales", "gan_loss", "perceptual_weights_path", "perceptual_pretrained")


@register_model("s2d")
class SparseToDense(AnimationModel):
    tiny_config = "tiny-s2d.yaml"
    driving_signal = "landmarks"
    default_model_params = {
        "num_landmarks": 74,
        # M_G and M_L1..3 (modules/s2d_motion.py); local patches are patch_fraction x the frame
        "motion_params": {"block_expansion": 32, "max_features": 512, "num_blocks": 5,
                          "local_block_expansion": 16, "local_max_features": 128,
                          "local_num_blocks": 3, "patch_fraction": 0.25, "adain_hidden": 128},
        # FOMM's VoxCeleb-256 generator (the paper: "the same architecture as [41]")
        "generator_params": {"block_expansion": 64, "max_features": 512, "num_down_blocks": 2,
                             "num_bottleneck_blocks": 6, "norm": "batch"},
        "discriminator_params": {"scales": [1.0], "block_expansion": 32, "max_features": 512,
                                 "num_blocks": 4, "use_spectral_norm": True},
        # Table 4's ablation switches; use_motion_input=false is Table 4's generator input
        "s2d_params": {"use_adain": True, "use_add_motion": True, "use_local_branches": True,
                       "use_motion_input": True},
        # where encode_source finds the source's landmarks when none are given: a landmarks
        # model checkpoint, or 'auto' = that checkpoint if named, else FAN, else dlib
        "source_landmarks": {"detector": "auto", "checkpoint": None},
    }
    default_train_params = dict(
        {key: OBJECTIVE_TRAIN_PARAMS[key] for key in SHARED_TRAIN_PARAMS},
        lr_motion=2.0e-4, lr_generator=2.0e-4, lr_discriminator=2.0e-4,
        loss_weights=S2D_LOSS_WEIGHTS)

    def __init__(self, config):
        super().__init__(config)
        params, train_params = config["model_params"], config["train_params"]
        switches = params["s2d_params"]
        self.num_landmarks = params["num_landmarks"]
        self.dense_motion = SparseToDenseMotion(
            num_landmarks=self.num_landmarks, use_adain=switches["use_adain"],
            use_add_motion=switches["use_add_motion"],
            use_local_branches=switches["use_local_branches"], **params["motion_params"])
        self.generator = ResidualMaskGenerator(use_motion_input=switches["use_motion_input"],
                                               **params["generator_params"])
        self.adversarial = AdversarialObjective(
            MultiScaleDiscriminator(use_kp=False, **params["discriminator_params"]), train_params)
        self.perceptual = PerceptualPyramid.from_config(train_params)
        self.loss_weights = train_params["loss_weights"]
        self.source_landmarks = params["source_landmarks"]
        self._landmarker = None           # loaded on first use; never part of the state dict

    # ---------------------------------------------------------------- declarations
    @classmethod
    def sidecars(cls, config):
        parsing = config["train_params"]["loss_weights"]["parsing"]
        return {"landmarks", "parsing"} if parsing else {"landmarks"}

    @classmethod
    def check_config(cls, config):
        params = config["model_params"]
        check_layout(params["num_landmarks"])
        detector = params["source_landmarks"]["detector"]
        if detector not in LANDMARKER_CHOICES:
            raise ValueError(f"model_params.source_landmarks.detector {detector!r}: expected one "
                             f"of {LANDMARKER_CHOICES}")
        if detector == "checkpoint" and not params["source_landmarks"]["checkpoint"]:
            raise ValueError("model_params.source_landmarks.detector is 'checkpoint': set "
                             "model_params.source_landmarks.checkpoint to a landmarks model "
                             "checkpoint")
        if params["num_landmarks"] != NUM_IBUG and detector in ("fan", "dlib"):
            raise ValueError(f"model_params.num_landmarks is {params['num_landmarks']} but the "
                             f"{detector} backend finds 68 points: set num_landmarks: 68 or "
                             f"detect with a 74-point landmarks checkpoint")
        super().check_config(config)

    def optimizer_groups(self):
        return self.adversarial.with_discriminator({
            "motion": list(self.dense_motion.parameters()),
            "generator": list(self.generator.parameters())})

    # ---------------------------------------------------------------- landmarks
    def layout(self, landmarks, what):
        """``B x N x 2`` landmarks in this model's layout (74-point arrays serve a 68-point
        model; the other way round is an error naming the fix)."""
        if landmarks.dim() != 3 or landmarks.shape[-1] != 2 or landmarks.shape[1] not in LAYOUTS:
            raise ValueError(f"{what} must be B x 68 or B x 74 x 2 normalized landmarks, got "
                             f"{tuple(landmarks.shape)}")
        if landmarks.shape[1] == self.num_landmarks:
            return landmarks
        if self.num_landmarks == NUM_IBUG:
            return ibug68(landmarks)
        raise ValueError(f"{what} have {landmarks.shape[1]} points but this model takes "
                         f"{self.num_landmarks} (model_params.num_landmarks): make 74-point "
                         f"landmarks with a trained landmarks model (tools/extract_landmarks.py "
                         f"--detector CHECKPOINT) or train with num_landmarks: 68")

    def landmarker(self):
        if self._landmarker is None:
            try:
                self._landmarker = load_landmarker(self.source_landmarks["detector"],
                                                   self.source_landmarks["checkpoint"])
            except FileNotFoundError as error:
                raise FileNotFoundError(f"the source's landmark detector "
                                        f"(model_params.source_landmarks) does not load: "
                                        f"{error}") from None
        return self._landmarker

    def detect(self, images, what):
        """Landmarks of ``images`` with the configured detector; an error naming the frames
        where it found no face."""
        landmarker = self.landmarker()
        points = landmarker(images)
        missing = (~torch.isfinite(points).all(dim=2).all(dim=1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"{landmarker.name} found no face in {what} {missing}; give the "
                             f"landmarks yourself (encode_source(source, landmarks=...), "
                             f"--driving_landmarks) or use a detector that finds it")
        return self.layout(points, what)

    # ---------------------------------------------------------------- shared by train and test
    def animate(self, source, source_landmarks, driving_landmarks):
        """F from the landmarks (eq. 3), then T (eqs. 1-2)."""
        motion = self.dense_motion(source, source_landmarks, driving_landmarks)
        generated = self.generator(source, motion["deformation"])
        generated.update(deformation=motion["deformation"],
                         global_deformation=motion["global_deformation"],
                         source_landmarks=source_landmarks, driving_landmarks=driving_landmarks)
        if motion["local_masks"]:
            generated["local_masks"] = torch.cat([motion["local_masks"][name]
                                                  for name in REGION_ORDER], dim=1)
        return generated

    # ---------------------------------------------------------------- training
    def usable_pairs(self, batch):
        """The batch without the pairs that have a frame without landmarks."""
        finite = [torch.isfinite(batch[key]).flatten(1).all(dim=1)
                  for key in ("source_landmarks", "driving_landmarks")]
        keep = finite[0] & finite[1]
        if bool(keep.all()):
            return batch
        if not bool(keep.any()):
            raise ValueError(f"no pair of this batch has landmarks on both frames (NaN rows in "
                             f"the sidecars of {batch.get('name')}): re-extract them or remove "
                             f"those videos")
        return {key: value[keep] if torch.is_tensor(value) and value.dim() and
                len(value) == len(keep) else value for key, value in batch.items()}

    def generator_step(self, batch):
        batch = self.usable_pairs(batch)
        source, driving = batch["source"], batch["driving"]
        generated = self.animate(source, self.layout(batch["source_landmarks"], "source landmarks"),
                                 self.layout(batch["driving_landmarks"], "driving landmarks"))
        generated.update(source=source, driving=driving)
        prediction, weights = generated["prediction"], self.loss_weights
        losses = {}
        if self.perceptual is not None:
            losses["perceptual"] = self.perceptual(prediction, driving)                # eq. 4
        if weights["l1"]:
            losses["l1"] = weights["l1"] * (prediction - driving).abs().mean()
        losses.update(self.adversarial.generator_losses(prediction, driving))          # eq. 6
        if weights["parsing"]:
            losses["parsing"] = weights["parsing"] * parsing_loss(                    # eq. 7
                batch["source_parsing"], batch["driving_parsing"], generated["deformation"])
        return losses, generated

    def discriminator_step(self, batch, generated):
        """Eq. 5 on the frames the generator step kept."""
        return self.adversarial.discriminator_losses(generated["driving"],
                                                     generated["prediction"])

    # ---------------------------------------------------------------- inference
    def encode_source(self, source, landmarks=None):
        """The source image and its landmarks (``landmarks`` B x N x 2 normalized, or detected)."""
        if landmarks is None:
            landmarks = self.detect(source, "source image")
        return {"source": source, "landmarks": self.layout(landmarks, "source landmarks")}

    def encode_driving(self, driving):
        """``B x N x 2`` normalized landmarks; frames ``B x 3 x H x W`` are accepted too (their
        landmarks are detected as the source's are)."""
        if driving.dim() == 4:
            return {"landmarks": self.detect(driving, "driving frames")}
        return {"landmarks": self.layout(driving, "driving landmarks")}

    def relative_motion(self, source, driving, reference, adapt_scale=False):
        """FOMM's relative motion on landmarks: S_lm + (D_lm - R_lm) * scale, scale = sqrt of
        the ratio of the landmark hulls' areas (source / reference) with ``adapt_scale``."""
        moved = relative_keypoints({"value": source["landmarks"]}, {"value": driving["landmarks"]},
                                   {"value": reference["landmarks"]},
                                   adapt_movement_scale=adapt_scale)
        return dict(driving, landmarks=moved["value"])

    def transfer(self, source, driving):
        return self.animate(source["source"], source["landmarks"], driving["landmarks"])

    def pose_descriptor(self, state):
        """The landmarks centred and scaled by the square root of their hull's area (pose and
        expression, not face position or size)."""
        landmarks = state["landmarks"]
        centred = landmarks - landmarks.mean(dim=1, keepdim=True)
        area = torch.as_tensor(keypoint_hull_area(landmarks), dtype=landmarks.dtype,
                               device=landmarks.device).clamp_min(1e-12)
        return (centred / area.sqrt()[:, None, None]).flatten(1)

    @torch.no_grad()
    def visuals(self, batch, generated):
        """Source and driving with their landmarks, T, E, the mask M, the residual R, F, and the
        local branches' masks (Fig. 1)."""
        radius, size = self.kp_radius, generated["prediction"].shape[-2:]
        columns = [("source", draw_keypoints(generated["source"], generated["source_landmarks"],
                                             radius)),
                   ("driving", draw_keypoints(generated["driving"],
                                              generated["driving_landmarks"], radius)),
                   ("prediction", generated["prediction"].detach().clamp(0, 1)),
                   ("warped source E", generated["deformed"].detach().clamp(0, 1)),
                   ("mask M", gray_to_rgb(generated["mask"], size)),
                   ("residual R", generated["residual"].detach().clamp(0, 1)),
                   ("dense motion F", flow_to_color(generated["deformation"]))]
        if "local_masks" in generated:
            masks = generated["local_masks"].sum(dim=1, keepdim=True).clamp(0, 1)
            columns.append(("local masks", gray_to_rgb(masks, size)))
        return columns
