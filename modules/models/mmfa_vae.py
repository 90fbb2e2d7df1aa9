"""MMFA's latent VAE of expressions (seed 004, section 3.3), trained after and apart from MMFA.

The frozen expression encoder of a trained ``mmfa`` checkpoint (``vae_params.mmfa_checkpoint``)
turns the training frames into expression features epsilon; the VAE (``modules/expression_vae.py``)
learns q(z | epsilon) and the decoder back, with

    L_VAE = lambda_KL KL(q(z | epsilon) || N(0, I)) + lambda_rec |epsilon - epsilon_hat|^2
            + lambda_adv L_adv(epsilon_hat)                                        (eq. 13)

(``loss_weights.kl``, ``reconstruction``, ``generator_gan``). The adversarial term, against a
feature discriminator that tells real features from reconstructions, is the paper's fix for the
posterior collapse it observed (the KL term winning and the decoder returning the average
expression). The paper's three weights did not survive in our copy of it; the defaults are ours.

It does not animate by itself (``animates = False``): at inference it moves an MMFA model's
expression through its latent space, ``interpolate`` giving the features between two images'
expressions (animate.py's ``ExpressionInterpolation``, ``run.py --interpolate_expression``).
The encoder is saved with the VAE, so the checkpoint is self-contained and can check that it
belongs to the MMFA model it is used with.
"""
import torch
import torch.nn.functional as F

from checkpoint import load_checkpoint
from modules.expression_encoder import ExpressionEncoder
from modules.expression_vae import ExpressionVAE, interpolate_features, kl_divergence
from modules.feature_discriminator import FeatureDiscriminator
from modules.model_base import AnimationModel
from modules.objectives import AdversarialObjective
from modules.registry import register_model

ENCODER_KEYS = ("feature_dim", "block_expansion", "widths", "pool_size")


def feature_strip(features, size):
    """Feature vectors ``B x d`` as gray bars ``B x 3 x h x w`` (0.5 + 0.5 tanh(value))."""
    bars = (0.5 + 0.5 * torch.tanh(features.detach()))[:, None, None, :]
    return F.interpolate(bars, size=size, mode="nearest").expand(-1, 3, -1, -1)


@register_model("mmfa_vae")
class MMFAExpressionVAE(AnimationModel):
    tiny_config = "tiny-mmfa-vae.yaml"
    animates = False
    default_model_params = {
        "common_params": {"num_channels": 3},
        # the MMFA model's expression encoder (its expression_params; checked against the
        # checkpoint's)
        "expression_params": {"feature_dim": 128, "block_expansion": 64,
                              "widths": [128, 256, 512, 512], "pool_size": 4},
        "vae_params": {
            "latent_dim": 32, "hidden": [256, 256],
            "mmfa_checkpoint": None,       # the trained mmfa model whose features the VAE learns
            "pretrained": True,            # false: a fixed random encoder (tests only)
        },
        "discriminator_params": {"hidden": [256, 256]},
    }
    default_train_params = {
        "lr_vae": 2.0e-4, "lr_discriminator": 2.0e-4,
        "gan_loss": "lsgan",
        "loss_weights": {"kl": 0.01, "reconstruction": 1.0,
                         "generator_gan": 0.1,          # lambda_adv
                         "discriminator_gan": 1.0,
                         "feature_matching": [0.0, 0.0]},
    }

    def __init__(self, config):
        super().__init__(config)
        model_params, train_params = config["model_params"], config["train_params"]
        expression, vae = model_params["expression_params"], model_params["vae_params"]
        self.vae_params = vae
        self.expression_encoder = ExpressionEncoder(
            model_params["common_params"]["num_channels"], expression["feature_dim"],
            expression["block_expansion"], tuple(expression["widths"]), expression["pool_size"])
        for parameter in self.expression_encoder.parameters():
            parameter.requires_grad_(False)
        self.register_buffer("encoder_loaded", torch.zeros((), dtype=torch.bool))
        self.vae = ExpressionVAE(expression["feature_dim"], vae["latent_dim"],
                                 tuple(vae["hidden"]))
        discriminator = FeatureDiscriminator(expression["feature_dim"],
                                             tuple(model_params["discriminator_params"]["hidden"]))
        self.adversarial = AdversarialObjective(discriminator, train_params)
        self.loss_weights = train_params["loss_weights"]
        self.train()

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        vae = config["model_params"]["vae_params"]
        if vae["pretrained"] and not vae["mmfa_checkpoint"]:
            raise ValueError("the expression VAE learns a trained MMFA model's expression features:"
                             " set model_params.vae_params.mmfa_checkpoint to that mmfa "
                             "checkpoint (or, for tests and smoke runs only, "
                             "vae_params.pretrained: false)")

    def train(self, mode=True):
        super().train(mode)
        self.expression_encoder.eval()          # frozen: batch norm keeps MMFA's statistics
        return self

    def prepare_training(self, dataset):
        """The MMFA checkpoint's expression encoder, unless this model's checkpoint brought it."""
        if self.vae_params["pretrained"] and not bool(self.encoder_loaded):
            self.load_mmfa_encoder(self.vae_params["mmfa_checkpoint"])

    def load_mmfa_encoder(self, path):
        state = load_checkpoint(path)
        if state.get("model") != "mmfa":
            raise ValueError(f"vae_params.mmfa_checkpoint {path} holds a {state.get('model')!r} "
                             "model; the expression VAE needs an 'mmfa' checkpoint")
        theirs = state["model_params"]
        ours = self.config["model_params"]
        for key in ENCODER_KEYS:
            if theirs["expression_params"][key] != ours["expression_params"][key]:
                raise ValueError(
                    f"model_params.expression_params.{key} is {ours['expression_params'][key]!r} "
                    f"here but {theirs['expression_params'][key]!r} in the MMFA checkpoint {path}; "
                    "copy the MMFA config's expression_params")
        prefix = "expression_encoder."
        self.expression_encoder.load_state_dict(
            {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)})
        self.encoder_loaded.fill_(True)

    # ---------------------------------------------------------------- training
    def optimizer_groups(self):
        return self.adversarial.with_discriminator({"vae": list(self.vae.parameters())})

    def generator_step(self, batch):
        frames = torch.cat([batch["source"], batch["driving"]])
        with torch.no_grad():
            feature = self.expression_encoder(frames)                       # epsilon
        out = self.vae(feature)
        weights = self.loss_weights
        losses = {"kl": weights["kl"] * kl_divergence(out["mu"], out["logvar"]),
                  "reconstruction": weights["reconstruction"]
                  * (out["reconstruction"] - feature.float()).pow(2).mean()}
        losses.update(self.adversarial.generator_losses(out["reconstruction"], feature))
        return losses, dict(out, feature=feature)

    def discriminator_step(self, batch, generated):
        return self.adversarial.discriminator_losses(generated["feature"],
                                                     generated["reconstruction"])

    @torch.no_grad()
    def visuals(self, batch, generated):
        """The driving frames, their expression features and the VAE's reconstructions."""
        driving = batch["driving"]
        half = (driving.shape[-2] // 2, driving.shape[-1])
        count = driving.shape[0]
        feature, reconstruction = generated["feature"][-count:], \
            generated["reconstruction"][-count:]
        bars = torch.cat([feature_strip(feature, half), feature_strip(reconstruction, half)],
                         dim=2)
        return [("driving", driving), ("feature / reconstruction",
                                       F.interpolate(bars, size=driving.shape[-2:]))]

    # ---------------------------------------------------------------- inference
    def check_encoder(self, encoder):
        """Refuse an MMFA expression encoder other than the one this VAE learned from."""
        theirs = encoder.state_dict()
        for key, value in self.expression_encoder.state_dict().items():
            if key not in theirs or theirs[key].shape != value.shape or \
                    not torch.equal(theirs[key].to(value), value):
                raise ValueError("this expression VAE was trained on another MMFA model's "
                                 f"expression features (encoder entry {key!r} differs); use the "
                                 "VAE trained with this MMFA checkpoint")

    @torch.no_grad()
    def interpolate(self, image_a, image_b, weights):
        """Expression features from image A's (t = 0) to image B's (t = 1) through the latent
        space: ``len(weights) x d`` (:func:`modules.expression_vae.interpolate_features`)."""
        features = self.expression_encoder(torch.cat([image_a, image_b]))
        return interpolate_features(self.vae, features[:1], features[1:], weights)
