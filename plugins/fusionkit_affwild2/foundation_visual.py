"""Foundation image encoders from ``timm`` as ``visual_backbone`` components: ``clip_vit``
(CLIP ViT image towers), ``dinov2`` (DINOv2 ViTs) and ``timm`` (any timm model by name).

timm is optional (``pip install 'fusionkit[foundation]'``); it is imported only when one of
these backbones is built, so registering them never needs it.

* **Input.** The extractor's faces, ``(B, 3, s, s)`` in ``[-1, 1]``; the module rescales them
  to ``[0, 1]`` and normalises with the model's own mean and std (from timm's pretrained
  configuration, known offline). ``s`` is the model's own input size (its pretrained
  configuration) unless ``img_size`` sets another (ViTs resample their position embeddings).
* **Output.** The final-norm token of the class token (``pool: cls``) or the mean of the patch
  tokens (``pool: mean``; a CNN's feature map is averaged). ``clip_vit`` then applies CLIP's
  image projection (``projection: true``, 512-d for ViT-B) so rows live in CLIP's joint space.
* **Weights.** ``pretrained: true`` (default) lets timm download them from the Hugging Face
  hub on the user's machine (cached by huggingface_hub); ``weights: FILE.safetensors`` loads
  a file in timm's key layout (the hub's ``model.safetensors`` loads as it is; timm's
  checkpoint filter adapts original DINOv2 / OpenAI CLIP layouts and other image sizes);
  ``pretrained: false`` gives random weights seeded by ``seed``. Architecture-only builds (on
  the meta device) never download.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fusionkit.plugin import DataError, Params, PluginError, first_few, one_line, register
from fusionkit_affwild2.backbones import MAX_SEED, load_backbone_weights, read_weights

__all__ = [
    "ClipParams",
    "DinoV2Params",
    "TimmFaces",
    "TimmParams",
    "clip_model_name",
    "dinov2_model_name",
]

_INSTALL = "pip install 'fusionkit[foundation]'"


class _TimmCommon(Params):
    pretrained: bool = Field(
        True,
        description="without weights: download the pretrained weights through timm (cached by "
        "huggingface_hub); false: random weights (features mean nothing)",
    )
    weights: Path | None = Field(
        None,
        description="safetensors file with the model's weights (timm key layout); overrides "
        "pretrained",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the random initialisation")
    pool: Literal["cls", "mean"] = Field(
        "cls", description="cls: the class token; mean: the mean of the patch tokens"
    )
    img_size: int | None = Field(
        None,
        ge=8,
        le=4096,
        description="input size fed to the model (default: its pretrained configuration's); "
        "set data.params.video.resize to at least this",
    )


class TimmParams(_TimmCommon):
    """Any timm image model by name (with its pretrained tag)."""

    model: str = Field(
        description="timm model name, e.g. vit_base_patch16_clip_224.openai (list them with "
        "timm.list_pretrained())"
    )
    head: bool = Field(
        False, description="apply the model's head to the pooled vector (e.g. CLIP's projection)"
    )


class ClipParams(_TimmCommon):
    """A CLIP ViT image tower (timm ``vit_*_clip_224.<tag>``)."""

    size: Literal["b16", "b32", "l14"] = Field(
        "b16", description="ViT-B/16 (768-d), ViT-B/32 (768-d) or ViT-L/14 (1024-d)"
    )
    tag: str = Field(
        "openai", description="pretrained weights: openai, laion2b, datacompxl, dfn2b, ..."
    )
    projection: bool = Field(
        True, description="apply CLIP's image projection (512-d for ViT-B, 768-d for ViT-L)"
    )


class DinoV2Params(_TimmCommon):
    """A DINOv2 ViT (timm ``vit_*_patch14[_reg4]_dinov2.lvd142m``)."""

    size: Literal["s14", "b14", "l14", "g14"] = Field(
        "s14", description="ViT-S/14 (384-d), B/14 (768-d), L/14 (1024-d) or g/14 (1536-d)"
    )
    registers: bool = Field(False, description="the variant with 4 register tokens")


_CLIP = {"b16": "vit_base_patch16", "b32": "vit_base_patch32", "l14": "vit_large_patch14"}
_DINO = {"s14": "vit_small", "b14": "vit_base", "l14": "vit_large", "g14": "vit_giant"}


def clip_model_name(p: ClipParams) -> str:
    return f"{_CLIP[p.size]}_clip_224.{p.tag}"


def dinov2_model_name(p: DinoV2Params) -> str:
    return f"{_DINO[p.size]}_patch14{'_reg4' if p.registers else ''}_dinov2.lvd142m"


def _timm(component: str) -> Any:
    try:
        import timm
    except ImportError:
        raise PluginError(
            f"visual_backbone '{component}' needs timm, which is not installed: {_INSTALL}"
        ) from None
    return timm


class TimmFaces(nn.Module):
    """A timm model on ``[-1, 1]`` faces: its own normalisation, then a pooled token.

    ``(B, 3, input_size, input_size)`` -> ``(B, out_dim)``.
    """

    def __init__(
        self, net: nn.Module, pool: str, head: bool, mean: Any, std: Any, input_size: int
    ) -> None:
        super().__init__()
        self.net = net
        self.pool = pool
        self.head = head
        self.input_size = input_size
        prefix = int(getattr(net, "num_prefix_tokens", 0))
        self.prefix_tokens = prefix
        if pool == "cls" and prefix == 0:
            raise ValueError(f"{type(net).__name__} has no class token; use pool: mean")
        width = int(net.num_features)
        self.out_dim = int(net.head.out_features) if head else width
        shape = (1, 3, 1, 1)
        self.register_buffer("mean", torch.tensor(mean, device="cpu").view(shape), False)
        self.register_buffer("std", torch.tensor(std, device="cpu").view(shape), False)

    def convert_state_dict(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a checkpoint onto this module's keys (``net.<timm key>``): a timm state dict as
        it is, or an original layout (DINOv2, OpenAI CLIP) through timm's checkpoint filter,
        which also resamples position embeddings to this image size."""
        sd = {k.removeprefix("net."): v for k, v in sd.items()}
        self._check_patch_size(sd)
        module = sys.modules.get(type(self.net).__module__)
        filt = getattr(module, "checkpoint_filter_fn", None)
        if filt is not None:
            try:
                sd = filt(sd, self.net)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise DataError(
                    f"the weights do not fit {type(self.net).__name__} ({one_line(exc)}): "
                    "check the component's size, registers or model against the file"
                ) from None
        if not self.head:  # the classifier / projection this module does not use
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        return {f"net.{k}": v for k, v in sd.items()}

    def _check_patch_size(self, sd: dict[str, Tensor]) -> None:
        """Refuse the weights of a ViT of another patch size: timm's checkpoint filter would
        resample its patch embedding (and positions) into this one without a word."""
        proj = getattr(getattr(self.net, "patch_embed", None), "proj", None)
        mine = getattr(proj, "weight", None)
        theirs = next(
            (sd[k] for k in ("patch_embed.proj.weight", "visual.conv1.weight") if k in sd), None
        )
        if mine is None or theirs is None or theirs.dim() != 4:
            return
        if tuple(theirs.shape[-2:]) != tuple(mine.shape[-2:]):
            raise DataError(
                f"the weights are of a ViT with {theirs.shape[-1]}-pixel patches and "
                f"{type(self.net).__name__} here has {mine.shape[-1]}-pixel patches: choose the "
                "component's size or model that matches the file (e.g. clip_vit size b32)"
            )

    def forward(self, faces: Tensor) -> Tensor:
        if faces.shape[-2:] != (self.input_size, self.input_size):
            raise DataError(
                f"{type(self.net).__name__} expects {self.input_size}x{self.input_size} faces, "
                f"got {tuple(faces.shape)}"
            )
        x = ((faces + 1) / 2 - self.mean) / self.std
        tokens = self.net.forward_features(x)
        if tokens.dim() == 4:  # a CNN's (B, C, H, W) map
            pooled = tokens.mean(dim=(2, 3))
        elif self.pool == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = tokens[:, self.prefix_tokens :].mean(dim=1)
        return self.net.head(pooled) if self.head else pooled


def build_timm_faces(component: str, model: str, p: _TimmCommon, head: bool) -> TimmFaces:
    """The timm ``model`` on faces: pretrained, from a weights file, or random (seeded)."""
    timm = _timm(component)
    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except RuntimeError:  # a known architecture with an unknown tag
        cfg = None
    if cfg is None:
        arch = model.split(".")[0]
        tags = first_few(timm.list_pretrained(f"{arch}.*"), 8) or "none"
        raise DataError(
            f"visual_backbone '{component}': timm knows no pretrained model {model!r} "
            f"(available for {arch}: {tags})"
        )
    on_meta = torch.get_default_device().type == "meta"
    fetch = p.pretrained and p.weights is None and not on_meta
    kwargs: dict[str, Any] = {"img_size": p.img_size} if p.img_size is not None else {}
    if not head:
        kwargs["num_classes"] = 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p.seed)
            net = timm.create_model(model, pretrained=fetch, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if not fetch:
            raise
        reason = one_line(exc, limit=200) or type(exc).__name__
        raise DataError(
            f"visual_backbone '{component}': cannot fetch the pretrained timm weights of "
            f"{model} ({reason}); run once with network access (cached by huggingface_hub), or "
            "set weights: FILE.safetensors, or pretrained: false for random weights"
        ) from None
    size = p.img_size or int(cfg.input_size[-1])
    faces = TimmFaces(net, p.pool, head, cfg.mean, cfg.std, size)
    if p.weights is not None:
        read = read_weights(p.weights)
        try:
            tensors = faces.convert_state_dict(read)
        except DataError as exc:
            raise DataError(f"backbone weights {p.weights}: {exc}") from None
        load_backbone_weights(faces, p.weights, tensors)
    return faces.eval()


@register("visual_backbone", "clip_vit")
def build_clip_vit(params: ClipParams) -> TimmFaces:
    """CLIP ViT image tower (timm; default ViT-B/16 OpenAI): face -> CLIP image embedding."""
    return build_timm_faces("clip_vit", clip_model_name(params), params, params.projection)


@register("visual_backbone", "dinov2")
def build_dinov2(params: DinoV2Params) -> TimmFaces:
    """DINOv2 ViT (timm; default ViT-S/14): face -> class token or mean patch token."""
    return build_timm_faces("dinov2", dinov2_model_name(params), params, False)


@register("visual_backbone", "timm")
def build_timm(params: TimmParams) -> TimmFaces:
    """Any timm image model by name (needs timm): face -> pooled token (or head output)."""
    return build_timm_faces("timm", params.model, params, params.head)
