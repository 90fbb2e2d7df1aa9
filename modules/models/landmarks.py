"""The face-landmark detector of the sparse-to-dense paper (seed 002, section 3.3) as a model of its
own: FAN-style stacked hourglass heatmaps, DSNT coordinates, the regression loss, and the
registration loss (SBR) on consecutive video frames.

    python run.py --config wflw-landmarks.yaml --mode train          # stage 1: WFLW stills
    python run.py --config vox-landmarks.yaml --mode train --run_name vox-landmarks \
        --checkpoint STAGE1.pth                                      # stage 2: videos

The paper trains on WFLW until convergence, then fine-tunes on videos "augmenting the regression
loss with the registration loss". Both stages are this model; the data decides what applies:

* regression (``loss_weights.regression``): DSNT's Euclidean loss plus its heatmap regularizer
  (``dsnt_params``), summed over the stacks, on the source and the driving frame of every item,
  against their landmarks (WFLW annotations, or landmark sidecars of videos; NaN rows and the six
  extra points of 68-point sidecars are not annotated and skipped);
* registration (``loss_weights.registration``): on pairs of nearby frames of one video
  (``dataset_params.max_frame_gap``, 1 = consecutive), each detection tracked to the other frame
  by the differentiable Lucas-Kanade tracker must land on the detection there, forward and
  backward, where the flow passes the forward-backward check (``fb_threshold`` pixels).

Its checkpoint is what the sparse-to-dense model detects source landmarks with
(``model_params.source_landmarks.checkpoint`` of ``s2d``) and what ``tools/extract_landmarks.py
--detector`` writes landmark sidecars with; :meth:`LandmarksModel.detect` runs it at the frame size
it was trained at, whatever the size of the images.
"""
import torch

from modules.landmark_detector import (DSNT_REGULARIZERS, LandmarkDetector,
                                       landmark_regression_loss, registration_loss)
from modules.landmark_layout import check_layout, pad_to_layout
from modules.landmark_sources import resize_images
from modules.model_base import AnimationModel
from modules.optical_flow import LucasKanadeTracker
from modules.registry import register_model
from modules.util import draw_keypoints


@register_model("landmarks")
class LandmarksModel(AnimationModel):
    tiny_config = "tiny-landmarks.yaml"
    animates = False
    # FAN4 at 256 x 256 (heatmaps at 64 x 64); 74 points (modules/landmark_layout.py)
    default_model_params = {
        "detector_params": {"num_landmarks": 74, "features": 256, "num_stacks": 4, "depth": 4,
                            "norm": "batch"},
        # DSNT's regularizer: js (Jensen-Shannon to a Gaussian, the DSNT paper's choice),
        # variance or none; sigma in heatmap pixels; weight relative to the Euclidean term
        "dsnt_params": {"regularizer": "js", "sigma": 1.0, "regularization_weight": 1.0},
        # the registration loss's Lucas-Kanade tracker (window radius in pixels, pyramid levels,
        # Gauss-Newton steps per level) and SBR's forward-backward check in pixels
        "tracker_params": {"radius": 4, "levels": 3, "iterations": 8, "damping": 1.0e-4},
        "fb_threshold": 1.0,
    }
    default_train_params = {
        "lr_detector": 2.0e-4,
        # registration: 0 trains on stills (stage 1); the video fine-tuning turns it on
        "loss_weights": {"regression": 1.0, "registration": 0.0},
    }

    def __init__(self, config):
        super().__init__(config)
        params = config["model_params"]
        self.detector = LandmarkDetector(**params["detector_params"])
        self.tracker = LucasKanadeTracker(**params["tracker_params"])
        self.dsnt = params["dsnt_params"]
        self.fb_threshold = params["fb_threshold"]
        self.loss_weights = config["train_params"]["loss_weights"]
        # the frame size it trains at: detect() resizes any image to it (kept in checkpoints)
        frame_shape = config["dataset_params"]["frame_shape"]
        self.register_buffer("frame_size", torch.tensor(frame_shape[:2]))

    @classmethod
    def sidecars(cls, config):
        return {"landmarks"} if config["train_params"]["loss_weights"]["regression"] else set()

    @classmethod
    def check_config(cls, config):
        params, weights = config["model_params"], config["train_params"]["loss_weights"]
        check_layout(params["detector_params"]["num_landmarks"])
        if params["dsnt_params"]["regularizer"] not in DSNT_REGULARIZERS:
            raise ValueError(f"model_params.dsnt_params.regularizer "
                             f"{params['dsnt_params']['regularizer']!r}: expected one of "
                             f"{DSNT_REGULARIZERS}")
        if not params["fb_threshold"] > 0:
            raise ValueError(f"model_params.fb_threshold must be positive (pixels), got "
                             f"{params['fb_threshold']}")
        if weights["registration"] and config["dataset_params"]["max_frame_gap"] is None:
            raise ValueError("loss_weights.registration needs pairs of nearby video frames: set "
                             "dataset_params.max_frame_gap (1 = consecutive frames)")
        if not (weights["regression"] or weights["registration"]):
            raise ValueError("the landmarks model needs loss_weights.regression or "
                             "loss_weights.registration above 0")
        super().check_config(config)

    @property
    def num_landmarks(self):
        return self.detector.num_landmarks

    def optimizer_groups(self):
        return {"detector": list(self.detector.parameters())}

    # ---------------------------------------------------------------- training
    def targets(self, landmarks):
        """Sidecar landmarks in the detector's layout: 68-point files padded with NaN (not
        annotated) when it predicts 74; 74-point files cut to 68 when it predicts 68."""
        check_layout(landmarks.shape[-2])
        return pad_to_layout(landmarks, self.num_landmarks)

    def generator_step(self, batch):
        source, driving = batch["source"], batch["driving"]
        prediction = self.detector(torch.cat([source, driving]))
        losses = {}
        weights = self.loss_weights
        if weights["regression"]:
            targets = torch.cat([self.targets(batch["source_landmarks"]),
                                 self.targets(batch["driving_landmarks"])])
            losses["regression"] = weights["regression"] * landmark_regression_loss(
                prediction, targets, self.dsnt["regularizer"], self.dsnt["sigma"],
                self.dsnt["regularization_weight"])
        detections = torch.stack(prediction["value"].chunk(2), dim=1)           # B x 2 x K x 2
        if weights["registration"]:
            frames = torch.stack([source, driving], dim=1)                     # B x 2 x C x H x W
            losses["registration"] = weights["registration"] * registration_loss(
                detections, frames, self.tracker, self.fb_threshold)
        return losses, {"source_detected": detections[:, 0], "driving_detected": detections[:, 1]}

    @torch.no_grad()
    def visuals(self, batch, generated):
        """Both frames with their target landmarks (when given) and with the detections."""
        radius = self.kp_radius
        columns = []
        for role in ("source", "driving"):
            if f"{role}_landmarks" in batch:
                target = torch.nan_to_num(self.targets(batch[f"{role}_landmarks"]), nan=-2.0)
                columns.append((f"{role} target", draw_keypoints(batch[role], target, radius)))
            columns.append((f"{role} detected",
                            draw_keypoints(batch[role], generated[f"{role}_detected"], radius)))
        return columns

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def detect(self, images):
        """Landmarks ``B x N x 2`` (normalized) of images ``B x 3 x H x W`` in [0, 1] of any
        size: the detector sees them resized to its training frame size."""
        size = tuple(int(v) for v in self.frame_size)
        return self.detector(resize_images(images, size))["value"]
