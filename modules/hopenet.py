"""Hopenet (Ruiz et al. 2018, "Fine-grained head pose estimation without keypoints").

face-vid2vid's head-pose loss compares the estimator's angles with those of a pretrained Hopenet
(a frozen ResNet-50 with three 66-bin classifiers); MMFA takes its rotation from the same kind of
network. The weights come from a file the user provides (the public ``hopenet_robust_alpha1``
snapshot: a plain state dict whose keys match this module's). Nothing is downloaded.

Input: 224 x 224 RGB normalized with the ImageNet mean and std (:func:`hopenet_input`).
"""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from modules.head_pose import NUM_BINS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPENET_SIZE = 224


def hopenet_input(image, size=HOPENET_SIZE):
    """Images in [0, 1] (``B x 3 x H x W``) resized bilinearly to ``size`` (no antialiasing, as
    the reference's tensor transform) and normalized with the ImageNet statistics."""
    resized = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
    mean = resized.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = resized.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (resized - mean) / std


class Hopenet(nn.Module):
    """ResNet-50 trunk (torchvision's bottleneck blocks, layers [3, 4, 6, 3]) -> 7x7 average pool
    -> yaw, pitch and roll logits over ``num_bins`` bins. ``fc_finetune`` is an unused layer kept
    because the published snapshot has it."""

    def __init__(self, layers=(3, 4, 6, 3), num_bins=NUM_BINS):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self.make_layer(64, layers[0])
        self.layer2 = self.make_layer(128, layers[1], stride=2)
        self.layer3 = self.make_layer(256, layers[2], stride=2)
        self.layer4 = self.make_layer(512, layers[3], stride=2)
        width = 512 * Bottleneck.expansion
        self.fc_yaw = nn.Linear(width, num_bins)
        self.fc_pitch = nn.Linear(width, num_bins)
        self.fc_roll = nn.Linear(width, num_bins)
        self.fc_finetune = nn.Linear(width + 3, 3)
        self.frozen = False

    def freeze(self):
        """Eval mode for good (``train()`` no longer leaves it) and no gradients to its weights:
        the loss network of the head-pose loss."""
        self.frozen = True
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self.eval()

    def train(self, mode=True):
        return super().train(mode and not self.frozen)

    def make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1,
                          stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        """``(yaw, pitch, roll)`` logits, each ``B x num_bins``."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.avg_pool2d(x, kernel_size=7).flatten(1)
        return self.fc_yaw(x), self.fc_pitch(x), self.fc_roll(x)


def load_hopenet(path, map_location="cpu"):
    """A frozen, eval-mode :class:`Hopenet` with the weights of the state-dict file at ``path``."""
    network = Hopenet()
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"Hopenet weights not found at {path}: the head-pose loss needs the pretrained "
            f"Hopenet snapshot (hopenet_robust_alpha1.pkl from the deep-head-pose project); "
            f"set train_params.hopenet_snapshot to its path, or set loss_weights.headpose to 0"
        ) from None
    network.load_state_dict(state)
    return network.freeze()
