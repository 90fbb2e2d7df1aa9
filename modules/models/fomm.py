"""First Order Motion Model (Siarohin et al. 2019): the common baseline and SAFA's ablation row 1.

Networks: keypoint detector (K keypoints + Jacobians), occlusion-aware generator with its dense
motion network, multi-scale discriminator. Losses: VGG-19 perceptual pyramid, optional LSGAN +
feature matching, equivariance of keypoint values and Jacobians.

As in FOMM, the adversarial part (generator GAN loss, feature matching and the discriminator
step) only runs when ``loss_weights.generator_gan`` is non-zero; the VoxCeleb default is 0.
"""
from config import deep_update
from modules.generator import OcclusionAwareGenerator
from modules.keypoint_model import KEYPOINT_MODEL_PARAMS, KEYPOINT_TRAIN_PARAMS, KeypointModel
from modules.registry import register_model


@register_model("fomm")
class FOMM(KeypointModel):
    tiny_config = "tiny-fomm.yaml"
    # FOMM's VoxCeleb-256 settings (docs/design.md, "Settings from the authors' code")
    default_model_params = deep_update(KEYPOINT_MODEL_PARAMS, {
        "generator_params": {
            "block_expansion": 64, "max_features": 512,
            "num_down_blocks": 2, "num_bottleneck_blocks": 6,
            "dense_motion_params": {
                "block_expansion": 64, "max_features": 1024, "num_blocks": 5,
                "scale_factor": 0.25,
                "num_occlusion_maps": 1,   # 0 turns occlusion off
                "kp_variance": 0.01,       # sigma of the heatmap gaussians (eq. 10)
                "downsample_method": "gaussian_subsample",   # the reference; or replicate_bilinear
            },
        },
    })
    default_train_params = KEYPOINT_TRAIN_PARAMS

    def __init__(self, config):
        super().__init__(config)
        model_params = config["model_params"]
        common = model_params["common_params"]
        self.generator = OcclusionAwareGenerator(num_channels=common["num_channels"],
                                                 num_kp=common["num_kp"],
                                                 align_corners=common["align_corners"],
                                                 **model_params["generator_params"])

    def generator_step(self, batch):
        kp_source = self.kp_detector(batch["source"])
        kp_driving = self.kp_detector(batch["driving"])
        generated = self.generator(batch["source"], kp_driving=kp_driving, kp_source=kp_source)
        generated.update(kp_source=kp_source, kp_driving=kp_driving)
        return self.image_losses(batch, generated), generated

    # ---------------------------------------------------------------- inference
    def encode_source(self, source):
        """Keypoints and the generator's encoder features: computed once per source."""
        return {"source": source, "kp": self.kp_detector(source),
                "features": self.generator.encode(source)}

    def encode_driving(self, driving):
        return {"kp": self.kp_detector(driving)}

    def transfer(self, source, driving):
        generated = self.generator(source["source"], kp_driving=driving["kp"],
                                   kp_source=source["kp"], source_features=source.get("features"))
        generated.update(kp_source=source["kp"], kp_driving=driving["kp"])
        return generated
