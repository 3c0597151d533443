"""Foundation backbones: torchaudio speech encoders (wav2vec2, hubert, wavlm) and timm image
models (clip_vit, dinov2, timm): architectures against the torchaudio bundles, layer choice,
weights (pretrained, safetensors, random), the waveform path on the video clock (exact
windows, chunking, alignment on real encoded media), normalisation and pooling of faces, a
clear line when timm is missing. Nothing is ever downloaded: every test runs with the
network blocked."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torchaudio
from safetensors.torch import save_file
from torch import nn

from fusionkit.core.errors import DataError, PluginError
from fusionkit.core.registry import get_registry
from fusionkit_affwild2.backbones import AudioBackboneSpec, VisualBackboneSpec, audio_input
from fusionkit_affwild2.extraction import AudioJob, backbone_identity, backbone_info, random_init
from fusionkit_affwild2.foundation_audio import BUNDLES, SpeechEncoder, layer_mix
from fusionkit_affwild2.media import load_audio, probe
from fusionkit_affwild2.waveform import (
    encode_chunked,
    encoder_frames,
    frame_windows,
    pool_frames,
)
from tests.affwild2_fixture import make_tree, overlap_mean
from tests.conftest import REPO

try:
    import timm
except ImportError:
    timm = None
needs_timm = pytest.mark.skipif(
    timm is None, reason="timm is not installed (pip install 'fusionkit[foundation]')"
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to use the network: {args[:2]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def speech(name: str = "wavlm", **params) -> AudioBackboneSpec:
    return AudioBackboneSpec(name=name, params={"pretrained": False, **params})


def tiny_wav2vec2(layers: int = 3, *, wavlm: bool = False, seed: int | None = 0) -> nn.Module:
    """A small torchaudio Wav2Vec2Model (or WavLM) with the real 7-layer CNN strides, its
    weights drawn under torch seed ``seed`` (``None``: from the global generator as it is)."""
    convs = [(8, 10, 5)] + [(8, 3, 2)] * 4 + [(8, 2, 2)] * 2
    common = dict(
        extractor_mode="group_norm",
        extractor_conv_layer_config=convs,
        extractor_conv_bias=False,
        encoder_embed_dim=16,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=8,
        encoder_pos_conv_groups=2,
        encoder_num_layers=layers,
        encoder_num_heads=2,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=32,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=False,
        encoder_layer_drop=0.0,
        aux_num_out=None,
    )
    if seed is not None:
        torch.manual_seed(seed)
    if wavlm:
        return torchaudio.models.wavlm_model(
            **common, encoder_num_buckets=16, encoder_max_distance=40
        ).eval()
    return torchaudio.models.wav2vec2_model(**common).eval()


# --------------------------------------------------------------------------- registration


def test_registering_imports_neither_timm_nor_torchaudio():
    code = (
        "import sys; from fusionkit.core.registry import get_registry; r = get_registry(); "
        "assert ('visual_backbone', 'dinov2') in r and ('audio_backbone', 'wavlm') in r; "
        "print(sorted(m for m in ('timm', 'torchaudio', 'av') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_a_missing_timm_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(PluginError) as info:
        VisualBackboneSpec(name="dinov2", params={"pretrained": False}).build()
    message = str(info.value)
    assert message == (
        "visual_backbone 'dinov2' needs timm, which is not installed: "
        "pip install 'fusionkit[foundation]'"
    )


# --------------------------------------------------------------------------- speech encoders


@pytest.mark.parametrize("key", sorted(BUNDLES))
def test_speech_architectures_are_the_bundles(key):
    """The public factories build exactly the bundles' architectures (state-dict keys and
    shapes, extractor norm, norm placement, waveform normalisation), on the meta device."""
    from torchaudio.pipelines._wav2vec2.utils import _get_model

    bundle_name, factory, layers, normalize = BUNDLES[key]
    bundle = getattr(torchaudio.pipelines, bundle_name)
    with torch.device("meta"):
        ours = getattr(torchaudio.models, factory)()
        theirs = _get_model(bundle._model_type, bundle._params)
        built = speech(key[0], size=key[1]).build()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    norm = [type(layer.layer_norm) for layer in ours.feature_extractor.conv_layers]
    assert norm == [type(layer.layer_norm) for layer in theirs.feature_extractor.conv_layers]
    placement = [layer.layer_norm_first for layer in ours.encoder.transformer.layers]
    assert placement == [layer.layer_norm_first for layer in theirs.encoder.transformer.layers]
    assert ours.encoder.transformer.layer_norm_first == theirs.encoder.transformer.layer_norm_first
    assert normalize == bundle._normalize_waveform
    assert len(ours.encoder.transformer.layers) == layers
    assert (built.sample_rate, built.frame_hop, built.frame_window) == (
        bundle.sample_rate,
        320,
        400,
    )
    assert built.out_dim == bundle._params["encoder_embed_dim"]
    assert set(built.state_dict()) == set(theirs.state_dict())  # the bundle's own key layout


def test_layer_choice_is_a_fixed_mix_of_transformer_outputs():
    model = tiny_wav2vec2(layers=3)
    wave = torch.randn(2, 4000)
    with torch.inference_mode():
        outs, _ = model.extract_features(wave)
    cases = {
        "layer 2": ([0, 1, 0], outs[1]),
        "last 2": ([0, 0.5, 0.5], (outs[1] + outs[2]) / 2),
        "weights": ([0.25, 0.0, 0.75], 0.25 * outs[0] + 0.75 * outs[2]),
        "all": ([1 / 3] * 3, sum(outs) / 3),
    }
    for what, (mix, expected) in cases.items():
        enc = SpeechEncoder(model, mix, normalize_waveform=False).eval()
        with torch.inference_mode():
            got = enc(wave)
        torch.testing.assert_close(got, expected, msg=what)
    assert SpeechEncoder(model, [1, 0, 0], False).used_layers == 1  # stops after layer 1
    # the params give these mixes
    assert layer_mix(speech(size="base", layer=-1).params)[-1] == 1.0
    assert layer_mix(speech(size="base", last_k=4).params)[-5:] == [0, 0.25, 0.25, 0.25, 0.25]
    assert layer_mix(speech(size="base").params) == pytest.approx([1 / 12] * 12)
    w = [0.0] * 11 + [2.0]
    assert layer_mix(speech(size="base", layer_weights=w).params)[-1] == 1.0


@pytest.mark.parametrize(
    "params, match",
    [
        ({"layer": 13}, r"layer must be in 1\.\.12"),
        ({"layer": 0}, r"layer must be in 1\.\.12"),
        ({"size": "large", "last_k": 25}, r"last_k must be <= 24"),
        ({"layer": 2, "last_k": 2}, r"at most one of layer, last_k, layer_weights"),
        ({"layer_weights": [1.0, 2.0]}, r"layer_weights needs 12 non-negative"),
        ({"size": "base_plus"}, r"Input should be 'base' or 'large'"),
    ],
)
def test_speech_params_are_checked(params, match):
    name = "hubert" if params.get("size") == "base_plus" else "wavlm"
    with pytest.raises(Exception, match=match):
        speech(name, **params)


def test_speech_encoders_take_waveforms():
    model = speech(layer=1).build()  # WavLM Base+, random weights, first layer only
    assert audio_input(model) == "waveform" and model.used_layers == 1
    with torch.inference_mode():
        out = model(torch.randn(2, 16000))
    assert out.shape == (2, encoder_frames(16000, 320, 400), 768) == (2, 49, 768)
    with pytest.raises(DataError, match=r"expects \(B, samples >= 400\)"):
        model(torch.randn(2, 399))
    info = backbone_info(speech(size="large"))
    assert (info.out_dim, info.input) == (1024, "waveform")
    assert backbone_info(AudioBackboneSpec(name="vggish")).input == "logmel"


def test_pretrained_speech_weights_come_from_the_bundle(monkeypatch):
    """pretrained: true builds through the bundle's get_model() (stubbed here), unwrapping
    the waveform-normalising wrapper of the large models."""
    from torchaudio.pipelines import Wav2Vec2Bundle
    from torchaudio.pipelines._wav2vec2.utils import _extend_model

    calls = []

    def fake_get_model(self, *, dl_kwargs=None):
        calls.append(self)
        return _extend_model(tiny_wav2vec2(wavlm=True, seed=5), normalize_waveform=True)

    monkeypatch.setattr(Wav2Vec2Bundle, "get_model", fake_get_model)
    spec = AudioBackboneSpec(name="wavlm", params={"size": "large", "layer": 2})
    model = spec.build()
    assert calls == [torchaudio.pipelines.WAVLM_LARGE]
    assert model.normalize_waveform  # as WAVLM_LARGE's get_model() does
    ref = tiny_wav2vec2(wavlm=True, seed=5)
    wave = torch.randn(1, 8000) * 3 + 1
    with torch.inference_mode():
        (outs, _) = ref.extract_features(nn.functional.layer_norm(wave, wave.shape[-1:]))
        torch.testing.assert_close(model(wave), outs[1])
    assert not random_init(spec)
    assert random_init(speech())
    assert backbone_identity(spec)["params"]["pretrained"] is True


def test_an_offline_pretrained_build_fails_in_one_line(monkeypatch, tmp_path):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # nothing cached
    with pytest.raises(DataError) as info:
        AudioBackboneSpec(name="hubert").build()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "audio_backbone 'hubert': cannot fetch the pretrained torchaudio.pipelines.HUBERT_BASE "
        "weights (<urlopen error no route to host>); run once with network access"
    )
    assert "set weights: FILE.safetensors, or pretrained: false" in message


def test_speech_weights_load_from_safetensors(monkeypatch, tmp_path):
    """weights: FILE loads the bundle's key layout (also the old weight-norm names)."""
    monkeypatch.setattr(torchaudio.models, "wav2vec2_base", lambda: tiny_wav2vec2(seed=1))
    ref = SpeechEncoder(tiny_wav2vec2(seed=9), [0, 1.0, 0], False).eval()
    sd = {f"model.{k}": v for k, v in ref.state_dict().items()}  # the large bundles' wrapper
    for old, new in (("weight_g", "original0"), ("weight_v", "original1")):
        key = f"model.encoder.transformer.pos_conv_embed.conv.parametrizations.weight.{new}"
        sd[key.replace(f"parametrizations.weight.{new}", old)] = sd.pop(key)
    path = tmp_path / "w2v.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    spec = AudioBackboneSpec(name="wav2vec2", params={"weights": str(path), "layer": 2})
    model = spec.build()
    wave = torch.randn(1, 6000)
    with torch.inference_mode():
        torch.testing.assert_close(model(wave), ref(wave))
    assert not random_init(spec)
    assert len(backbone_identity(spec)["params"]["weights_sha256"]) == 64
    bad = tmp_path / "bad.safetensors"
    save_file({"encoder.nothing": torch.zeros(2)}, str(bad))
    with pytest.raises(DataError, match=r"backbone weights .*bad\.safetensors do not fit"):
        AudioBackboneSpec(name="wav2vec2", params={"weights": str(bad)}).build()


# --------------------------------------------------------------------------- video clock


@pytest.mark.parametrize(
    "fps, anchor, width",
    [
        (Fraction(25), "start", None),
        (Fraction(30000, 1001), "start", None),
        (Fraction(24000, 1001), "center", None),
        (Fraction(15, 2), "center", Fraction(1, 10)),
        (Fraction(30), "start", Fraction(24, 25)),
    ],
)
def test_frame_windows_are_exact(fps, anchor, width):
    n, hop, win, sr = 40_000, 320, 400, 16000  # 2.5 s of audio, 124 encoder frames
    num_frames = int(3 * fps)  # the video runs past the audio
    w = frame_windows(num_frames, fps, sr, hop, win, n, anchor, width)
    frames = torch.arange(encoder_frames(n, hop, win), dtype=torch.float64)[:, None]
    pooled = pool_frames(frames, w)
    size = Fraction(1) / fps if width is None else width
    for k in range(num_frames):
        expected = overlap_mean(frames, k, fps, anchor=anchor, width=width)
        assert float(pooled[k]) == pytest.approx(float(expected)), k
        start = Fraction(k) / fps - (size / 2 if anchor == "center" else 0)
        assert bool(w.present[k]) == (start < Fraction(n, sr) and start + size > 0), k
    if fps == 25 and width is None:  # 40 ms windows on a 20 ms grid: frames 2k-1, 2k, 2k+1
        assert w.lo[1:10].tolist() == [2 * k - 1 for k in range(1, 10)]
        assert w.hi[:10].tolist() == [2 * k + 1 for k in range(10)]


class LocalEncoder(nn.Module):
    """A waveform backbone whose frame j depends on its own samples only (so chunking is
    exact); it records the lengths it was called with."""

    input = "waveform"
    sample_rate = 16000
    frame_hop = 320
    frame_window = 400
    out_dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def forward(self, wave):
        self.calls.append(tuple(wave.shape))
        spans = wave.unfold(1, self.frame_window, self.frame_hop)
        return torch.stack([spans.mean(-1), spans.abs().amax(-1)], -1)


def test_chunked_encoding_is_exact_and_bounded():
    wave = torch.randn(16000 * 7 + 123)
    model = LocalEncoder()
    whole = model(wave[None])[0]
    model.calls.clear()
    out = encode_chunked(
        model, wave, chunk_frames=50, context_frames=10, chunks_per_batch=3, device="cpu"
    )
    torch.testing.assert_close(out, whole)
    longest = (50 + 2 * 10 - 1) * 320 + 400
    assert max(length for _, length in model.calls) == longest  # memory is bounded
    assert max(batch for batch, _ in model.calls) == 3  # equal-length chunks are batched
    assert sum(batch for batch, _ in model.calls) == -(-whole.shape[0] // 50)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("foundation") / "aw2")


@pytest.mark.parametrize("anchor, window_ms", [("start", None), ("center", 100.0)])
def test_waveform_rows_are_aligned_on_real_media(generated, tmp_path, anchor, window_ms):
    """Row k of a WavLM cache is the mean of the encoder frames overlapping frame k's window,
    on NTSC (29.97 fps) and film (23.976 fps, audio starting 0.2 s late) encoded media."""
    spec = speech(size="base", layer=1)
    model = spec.build()
    from fusionkit_affwild2.cache import CacheFolder

    for media in ("vid_b.mp4", "vid_e.mp4"):
        path = generated.root / "raw_videos" / media
        job = AudioJob(
            item=path.stem,
            media=str(path),
            cache_root=str(tmp_path),
            extractor={"name": "wavlm", "test": anchor},
            versions={},
            backbone=spec,
            logmel={},
            anchor=anchor,
            sync="container",
            frame_count="decode",
            batch_size=8,
            device="cpu",
            waveform={"window_ms": window_ms, "chunk_seconds": 1.0, "context_seconds": 30.0},
        )
        job.run()
        tensors, meta = CacheFolder(tmp_path, "audio", job.extractor).load(path.stem)
        info = probe(path)
        feats, present = tensors["features"], tensors["present"]
        assert feats.shape == (info.num_frames, 768)
        wave = load_audio(path, 16000, "container")
        with torch.inference_mode():
            frames = model(wave[None])[0]  # the whole clip at once, independently
        assert meta["info"]["encoder_frames"] == frames.shape[0]
        fps = Fraction(info.fps_exact)
        width = None if window_ms is None else Fraction(1, 10)
        for k in (0, 1, 7, info.num_frames // 2, info.num_frames - 1):
            expected = overlap_mean(frames, k, fps, anchor=anchor, width=width)
            torch.testing.assert_close(feats[k], expected, atol=1e-4, rtol=1e-4)
        # present where the frame's window overlaps the recording: vid_e's audio stream starts
        # 0.2 s late, and the silence put before it is not audio (it used to count as such)
        late = Fraction(str(generated.media[path.stem].audio_offset))
        size = Fraction(1) / fps if width is None else width
        starts = [Fraction(k) / fps - (size / 2 if anchor == "center" else 0) for k in
                  range(info.num_frames)]  # fmt: skip
        assert present.tolist() == [s + size > late for s in starts]
        assert (not present.all()) == (late > 0)


# --------------------------------------------------------------------------- image encoders


@needs_timm
def test_dinov2_and_clip_use_their_own_normalisation_and_pooling():
    dino = VisualBackboneSpec(name="dinov2", params={"pretrained": False, "img_size": 28})
    model = dino.build()
    cfg = timm.models.get_pretrained_cfg("vit_small_patch14_dinov2.lvd142m")
    assert model.mean.flatten().tolist() == pytest.approx(cfg.mean)
    assert model.std.flatten().tolist() == pytest.approx(cfg.std)
    assert (model.input_size, model.out_dim) == (28, 384)
    faces = torch.rand(3, 3, 28, 28) * 2 - 1
    with torch.inference_mode():
        normed = ((faces + 1) / 2 - model.mean) / model.std
        expected = model.net.forward_features(normed)
        torch.testing.assert_close(model(faces), expected[:, 0])
        unnormalised = model.net.forward_features(faces)
        assert not torch.allclose(unnormalised[:, 0], expected[:, 0])
        mean_pool = VisualBackboneSpec(
            name="dinov2", params={"pretrained": False, "img_size": 28, "pool": "mean"}
        ).build()
        torch.testing.assert_close(mean_pool(faces), expected[:, 1:].mean(1))
    assert backbone_info(VisualBackboneSpec(name="dinov2")).input_size == 518  # its own size
    clip = VisualBackboneSpec(name="clip_vit", params={"pretrained": False, "img_size": 32})
    net = clip.build()
    assert net.out_dim == 512 and net.input_size == 32  # CLIP's image projection
    assert net.mean.flatten().tolist() == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    with torch.inference_mode():
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    plain = VisualBackboneSpec(name="clip_vit", params={"pretrained": False, "projection": False})
    assert backbone_info(plain).out_dim == 768
    assert backbone_info(plain).input_size == 224
    with pytest.raises(DataError, match=r"expects 28x28 faces"):
        model(torch.zeros(1, 3, 32, 32))
    with pytest.raises(DataError, match=r"timm knows no pretrained model 'vit_base_patch16"):
        VisualBackboneSpec(name="clip_vit", params={"tag": "nope", "pretrained": False}).build()


@needs_timm
def test_timm_weights_load_from_safetensors(tmp_path):
    """A file in timm's key layout (the hub's model.safetensors) loads as it is, also into
    another image size (position embeddings resampled by timm's checkpoint filter)."""
    ref = VisualBackboneSpec(
        name="dinov2", params={"pretrained": False, "img_size": 28, "seed": 3}
    ).build()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.net.state_dict().items()}, str(path))
    spec = VisualBackboneSpec(name="dinov2", params={"weights": str(path), "img_size": 28})
    faces = torch.rand(2, 3, 28, 28) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(spec.build()(faces), ref(faces))
        bigger = VisualBackboneSpec(name="dinov2", params={"weights": str(path), "img_size": 42})
        assert bigger.build()(torch.zeros(1, 3, 42, 42)).shape == (1, 384)
    assert not random_init(spec)


@needs_timm
def test_timm_weights_with_the_head_keep_the_head(tmp_path):
    """With ``head: true`` (CLIP's ``projection: true``) a weights file's ``head`` tensors are
    loaded and applied, not dropped as they are when the head is not used."""
    params = {"model": "test_vit.r160_in1k", "head": True, "img_size": 32}
    ref = VisualBackboneSpec(name="timm", params={**params, "pretrained": False, "seed": 3})
    ref = ref.build()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.net.state_dict().items()}, str(path))
    got = VisualBackboneSpec(name="timm", params={**params, "weights": str(path)}).build()
    assert torch.equal(got.net.head.weight, ref.net.head.weight)
    faces = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        out = got(faces)
        torch.testing.assert_close(out, ref(faces))
    assert out.shape == (2, ref.net.head.out_features)


@needs_timm
def test_pretrained_timm_weights_are_fetched_by_timm(monkeypatch):
    seen = []

    def fake_create(name, pretrained=False, **kwargs):
        seen.append((name, pretrained, kwargs))
        if name.startswith("vit_base"):
            raise RuntimeError("hub unreachable\nretry later")
        return real_create(name, pretrained=False, **kwargs)

    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", fake_create)
    VisualBackboneSpec(name="dinov2", params={"img_size": 28}).build()
    assert seen[-1] == (
        "vit_small_patch14_dinov2.lvd142m",
        True,
        {"img_size": 28, "num_classes": 0},
    )
    with pytest.raises(DataError) as info:
        VisualBackboneSpec(name="clip_vit").build()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "visual_backbone 'clip_vit': cannot fetch the pretrained timm weights of "
        "vit_base_patch16_clip_224.openai (hub unreachable; retry later); run once with network "
        "access"
    )
    with torch.device("meta"):  # architecture-only builds never fetch
        VisualBackboneSpec(name="dinov2").build()
    assert seen[-1][1] is False


# --------------------------------------------------------------------------- extract


@needs_timm
def test_extract_warns_about_random_weights_and_uses_the_waveform_cache(generated):
    from fusionkit_affwild2.dataset import AffWild2Dataset

    comp = get_registry().get("dataset", "affwild2")
    params = comp.params.model_validate(
        {
            "root": str(generated.root),
            "audio": {"backbone": {"name": "wavlm", "params": {"pretrained": False, "layer": 1}}},
            "video": {
                "backbone": {"name": "dinov2", "params": {"pretrained": False, "img_size": 14}},
                "resize": 14,
            },
            "device": "cpu",
        }
    )
    ds = AffWild2Dataset(params)
    assert ds.feature_dims == {"audio": 768, "video": 384}
    assert ds.audio_input == "waveform"
    extractor = ds.audio_cache.extractor
    assert "logmel" not in extractor and extractor["waveform"]["chunk_seconds"] == 16.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds._warn_random_init()
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(
        "affwild2: the audio backbone 'wavlm' and video backbone 'dinov2' have random weights"
    )
    assert "\n" not in message


def test_the_foundation_recipe_is_complete(generated):
    from fusionkit.core.recipe import load_recipe

    rc = load_recipe(
        REPO / "recipes" / "affwild2" / "foundation.yaml", [f"data.params.root={generated.root}"]
    )
    p = rc.data.params
    assert (p.audio.backbone.name, p.audio.backbone.params.size) == ("wavlm", "base_plus")
    assert p.audio.backbone.params.pretrained and p.video.backbone.params.pretrained
    assert (p.video.backbone.name, p.video.backbone.params.img_size, p.video.resize) == (
        "dinov2",
        224,
        224,
    )
    assert not random_init(p.audio.backbone) and not random_init(p.video.backbone)
    assert Path(REPO / "docs" / "data.md").read_text().count("recipes/affwild2/foundation.yaml")
