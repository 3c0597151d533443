"""Checks of components that work on whole videos: datasets and perturbations."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

from fusionkit.core.errors import DataError
from fusionkit.core.interfaces import Video
from fusionkit.core.params import first_few
from fusionkit.testing._params import not_pydantic, params_checks
from fusionkit.testing._report import CHECKS, ConformanceReport, Runner, Violation
from fusionkit.testing._util import axes, default_name, identical, seeded, shape_of


def check_video(v: Any, i: int, split: str, dims: dict[str, int], n_targets: int) -> None:
    where = f"split '{split}' video {i}"
    if not isinstance(v, Video):
        raise Violation(f"{where}: expected a fusionkit.Video; got {type(v).__name__}")
    where = f"split '{split}' video {i} ({v.name!r})"
    if not isinstance(v.labels, Tensor) or v.labels.dim() != 2:
        raise Violation(
            f"{where}: labels must be (N, n_targets={n_targets}); got {shape_of(v.labels)}"
        )
    n = int(v.labels.shape[0])
    if tuple(v.labels.shape) != (n, n_targets) or not v.labels.is_floating_point():
        raise Violation(
            f"{where}: labels must be float (N={n}, n_targets={n_targets}); got "
            f"{shape_of(v.labels)} {v.labels.dtype}"
        )
    if set(v.features) != set(dims):
        raise Violation(
            f"{where}: feature modalities {sorted(v.features)} != feature_dims {sorted(dims)}"
        )
    for m, d in sorted(dims.items()):
        x = v.features[m]
        if not isinstance(x, Tensor) or tuple(x.shape) != (n, d) or not x.is_floating_point():
            raise Violation(
                f"{where}: features['{m}'] must be float {axes(N=n, F=d)} like the labels' N; "
                f"got {shape_of(x)} {getattr(x, 'dtype', '')}".rstrip()
            )
        if not bool(torch.isfinite(x).all()):
            raise Violation(f"{where}: features['{m}'] {shape_of(x)} has non-finite values")
    lm = v.label_mask
    if not isinstance(lm, Tensor) or tuple(lm.shape) != (n,) or lm.dtype != torch.bool:
        raise Violation(
            f"{where}: label_mask must be bool (N={n},); got {shape_of(lm)} "
            f"{getattr(lm, 'dtype', '')}".rstrip()
        )
    if not bool(torch.isfinite(v.labels[lm]).all()):
        raise Violation(f"{where}: labels are not finite on labelled frames")
    if not (isinstance(v.fps, int | float) and math.isfinite(v.fps) and v.fps > 0):
        raise Violation(f"{where}: fps must be a positive number; got {v.fps!r}")
    if v.frame_ids is not None and tuple(v.frame_ids.shape) != (n,):
        raise Violation(f"{where}: frame_ids must be (N={n},) or None; got {shape_of(v.frame_ids)}")
    for m, p in sorted(v.present.items()):
        if m not in v.features:
            raise Violation(f"{where}: present names {m!r}, which has no features")
        if not isinstance(p, Tensor) or tuple(p.shape) != (n,) or p.dtype != torch.bool:
            raise Violation(
                f"{where}: present['{m}'] must be bool (N={n},); got {shape_of(p)} "
                f"{getattr(p, 'dtype', '')}".rstrip()
            )


class DatasetChecks:
    def __init__(
        self, build: Callable[..., Any], params: BaseModel, label: str, max_videos: int
    ) -> None:
        self.build_fn = build
        self.params = params
        self.label = label
        self.max_videos = max_videos
        self.ds: Any = None

    def build(self) -> None:
        self.ds = self.build_fn(self.params)

    def protocol(self) -> None:
        ds = self.ds
        dims = getattr(ds, "feature_dims", None)
        if (
            not isinstance(dims, dict)
            or not dims
            or not all(isinstance(k, str) and isinstance(d, int) and d > 0 for k, d in dims.items())
        ):
            raise Violation(
                f"feature_dims must be a non-empty {{modality: int > 0}} dict; got {dims!r}"
            )
        targets = getattr(ds, "targets", None)
        if (
            not isinstance(targets, tuple | list)
            or not targets
            or not all(isinstance(t, str) for t in targets)
        ):
            raise Violation(f"targets must be a non-empty tuple of label names; got {targets!r}")
        splits = ds.splits() if callable(getattr(ds, "splits", None)) else None
        if not isinstance(splits, tuple | list) or not splits:
            raise Violation(
                f"splits() must return a non-empty tuple of split names; got {splits!r}"
            )
        if not callable(getattr(ds, "videos", None)):
            raise Violation("datasets provide videos(split) -> sequence of fusionkit.Video")

    def videos(self) -> None:
        ds = self.ds
        dims, n_targets = dict(ds.feature_dims), len(ds.targets)
        for split in ds.splits():
            vids = ds.videos(split)
            if len(vids) == 0:
                raise Violation(f"split '{split}' has no videos")
            names = [v.name for v in vids]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise Violation(
                    f"split '{split}': video names must be unique; repeated: {first_few(dupes)}"
                )
            for i, v in enumerate(list(vids)[: self.max_videos]):
                check_video(v, i, split, dims, n_targets)

    def unknown_split(self) -> None:
        probe = "__fusionkit_no_such_split__"
        try:
            self.ds.videos(probe)
        except DataError:
            return
        except Exception as exc:
            raise Violation(
                f"videos({probe!r}) raised {type(exc).__name__}; an unknown split must raise "
                "fusionkit.core.errors.DataError naming the splits"
            ) from None
        raise Violation(f"videos({probe!r}) returned; an unknown split must raise DataError")

    def determinism(self) -> None:
        other = self.build_fn(self.params)
        split = min(self.ds.splits(), key=lambda s: len(self.ds.videos(s)))
        a, b = list(self.ds.videos(split)), list(other.videos(split))
        if len(a) != len(b):
            raise Violation(f"split '{split}': {len(a)} videos, then {len(b)} from a second build")
        for i, (va, vb) in enumerate(list(zip(a, b, strict=True))[: self.max_videos]):
            same = va.name == vb.name and identical(va.labels, vb.labels)
            same = same and all(identical(va.features[m], vb.features[m]) for m in va.features)
            if not same:
                raise Violation(
                    f"split '{split}' video {i} ({va.name!r}) differs between two builds with "
                    "the same params; a dataset must be a function of its params"
                )


def check_dataset(
    build: Callable[..., Any],
    params: BaseModel,
    *,
    name: str | None = None,
    skip: Iterable[str] = (),
    seed: int = 0,
    max_videos: int = 8,
) -> ConformanceReport:
    """Check a dataset build function ``build(params)`` (the lighter dataset contract).

    Args:
        max_videos: records checked in detail per split (all are counted and named).
        Others as in :func:`check_encoder`.
    """
    name = default_name(build, name, "dataset")
    bad = not_pydantic("dataset", name, params)
    if bad is not None:
        return bad
    report = ConformanceReport("dataset", name, params=params.model_dump(mode="json"))
    label = f"dataset '{name}'"
    runner = Runner(report, skip, label)
    checks = DatasetChecks(build, params, label, max_videos)
    with seeded(seed):
        if not runner.run("build", checks.build):
            runner.skip_rest(CHECKS["dataset"], "the dataset could not be built")
            return report
        runner.run("params", lambda: params_checks(params))
        if not runner.run("protocol", checks.protocol):
            runner.skip_rest(CHECKS["dataset"], "skipped after the protocol check failed")
            return report
        runner.run("videos", checks.videos)
        runner.run("unknown-split", checks.unknown_split)
        runner.run("determinism", checks.determinism)
    return report


def dummy_video(n: int = 40) -> Video:
    """A small two-modality record (audio 6, video 5 features) with a few unlabelled frames,
    and frames 12-17 without video (zero-filled, not present), as a missing face."""
    gen = torch.Generator().manual_seed(1234)
    mask = torch.ones(n, dtype=torch.bool)
    mask[5:9] = False
    video = torch.randn(n, 5, generator=gen)
    present = torch.ones(n, dtype=torch.bool)
    present[12:18] = False
    video[~present] = 0.0
    return Video(
        name="conformance_video",
        features={"audio": torch.randn(n, 6, generator=gen), "video": video},
        labels=torch.rand(n, 2, generator=gen) * 2 - 1,
        label_mask=mask,
        fps=30.0,
        frame_ids=torch.arange(n),
        present={"video": present},
    )


def same_video(a: Video, b: Video) -> bool:
    return (
        a.name == b.name
        and set(a.features) == set(b.features)
        and all(identical(a.features[m], b.features[m]) for m in a.features)
        and identical(a.labels, b.labels)
        and identical(a.label_mask, b.label_mask)
        and set(a.present) == set(b.present)
        and all(identical(a.present[m], b.present[m]) for m in a.present)
    )


class PerturbationChecks:
    def __init__(self, build: Callable[..., Any], params: BaseModel, seed: int) -> None:
        self.build_fn = build
        self.params = params
        self.seed = seed
        self.fn: Any = None

    def build(self) -> None:
        self.fn = self.build_fn(self.params)
        if not callable(self.fn):
            raise Violation(f"build returned a non-callable {type(self.fn).__name__}")

    def _apply(self, fn: Any, video: Video) -> Any:
        return fn(video, torch.Generator().manual_seed(self.seed))

    def apply(self) -> None:
        video = dummy_video()
        out = self._apply(self.fn, video)
        if not isinstance(out, Video):
            raise Violation(
                f"perturbation(video, generator) must return a new fusionkit.Video; got "
                f"{type(out).__name__}"
            )
        dims = {m: int(x.shape[1]) for m, x in video.features.items()}
        check_video(out, 0, "<dummy>", dims, int(video.labels.shape[1]))

    def presence(self) -> None:
        """A frame moved to another position (its row equals input row ``j != i``) carries
        the presence of the frame it shows, so that a missing frame moved onto a present one
        stays absent (``plugin.with_moved_frames`` does this)."""
        video = dummy_video()
        out = self._apply(self.fn, video)
        for m, was in video.present.items():
            x_in, x_out = video.features[m], out.features[m]
            now = out.present.get(m, torch.ones(len(x_out), dtype=torch.bool))
            rows = {x_in[j].numpy().tobytes(): j for j in range(len(x_in)) if bool(was[j])}
            for i in range(len(x_out)):
                j = rows.get(x_out[i].numpy().tobytes())
                if j is not None and j != i and not bool(now[i]):
                    raise Violation(
                        f"modality {m!r}: frame {i} shows input frame {j}, which is present, "
                        f"but is marked absent (and the absent frames moved elsewhere are "
                        "marked present, so z-scoring turns their fill into -mean/std): move "
                        "presence with the frames, with plugin.with_moved_frames"
                    )

    def out_of_place(self) -> None:
        video = dummy_video()
        before = dummy_video()
        self._apply(self.fn, video)
        if not same_video(video, before):
            raise Violation(
                "the input video's tensors changed; perturbations work out of place (return a "
                "new Video, never write into the given one)"
            )

    def determinism(self) -> None:
        a = self._apply(self.fn, dummy_video())
        b = self._apply(self.build_fn(self.params), dummy_video())
        if not same_video(a, b):
            raise Violation(
                "two calls with generators seeded alike gave different videos; draw all "
                "randomness from the given generator"
            )


def check_perturbation(
    build: Callable[..., Any],
    params: BaseModel,
    *,
    name: str | None = None,
    skip: Iterable[str] = (),
    seed: int = 0,
) -> ConformanceReport:
    """Check a perturbation build function ``build(params)``.

    The built callable maps ``(video, generator) -> Video`` out of place, drawing all randomness
    from ``generator``. It is applied to a small audio (6) + video (5) record.
    """
    name = default_name(build, name, "perturbation")
    bad = not_pydantic("perturbation", name, params)
    if bad is not None:
        return bad
    report = ConformanceReport("perturbation", name, params=params.model_dump(mode="json"))
    runner = Runner(report, skip, f"perturbation '{name}'")
    checks = PerturbationChecks(build, params, seed)
    with seeded(seed):
        if not runner.run("build", checks.build):
            runner.skip_rest(CHECKS["perturbation"], "the perturbation could not be built")
            return report
        runner.run("params", lambda: params_checks(params))
        runner.run("apply", checks.apply)
        runner.run("presence", checks.presence)
        runner.run("out-of-place", checks.out_of_place)
        runner.run("determinism", checks.determinism)
    return report
