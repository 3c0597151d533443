"""The official Aff-Wild2 tree: annotation folders, label files, raw media, crops, splits.

Every reader raises :class:`~fusionkit.plugin.DataError` naming the file (and line) at fault.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusionkit.plugin import DataError, first_few

__all__ = [
    "HEADER",
    "MEDIA_SUFFIXES",
    "UNLABELLED",
    "ZERO_CROP",
    "Labels",
    "crop_indices",
    "find_annotation_sets",
    "fold_split",
    "index_media",
    "media_name",
    "read_labels",
    "read_name_list",
    "read_submission_template",
    "require_submission_template",
    "template_rows",
    "warn_shared_media",
    "zero_based_crops_error",
]

HEADER = "valence,arousal"
#: The value marking an unannotated frame in both columns.
UNLABELLED = -5.0
MEDIA_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".mpg", ".mpeg", ".webm", ".m4v")
_SIDE = re.compile(r"_(left|right)$")
_CROP = re.compile(r"^(\d+)\.jpg$", re.IGNORECASE)
#: image files that are not crops as named above, in a crop folder that holds no crop
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# Folder names of the partitions across ABAW editions.
TRAIN_NAMES = ("Train_Set", "Training_Set")
VAL_NAMES = ("Validation_Set",)


def media_name(trial: str) -> str:
    """The raw video a trial comes from: ``_left`` / ``_right`` trials share it."""
    return _SIDE.sub("", trial)


@dataclass(frozen=True)
class Labels:
    """One annotation file.

    Attributes:
        values: ``(L, 2)`` float32 valence, arousal; 0 on unannotated rows.
        mask: ``(L,)`` bool, False on ``-5`` rows.
        path: the file read.
    """

    values: np.ndarray
    mask: np.ndarray
    path: Path

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])


#: Most frame rows an annotation file may hold (over 9 hours at 30 fps; the longest Aff-Wild2
#: video has about 50,000 frames): a larger file is refused before it is read.
MAX_LABEL_ROWS = 1_000_000


def read_labels(path: Path) -> Labels:
    """Read ``valence,arousal`` then one ``v,a`` row per video frame; ``-5`` marks a frame
    without annotation (masked). Values other than ``-5`` must lie in ``[-1, 1]``."""
    try:  # a row is at least 4 bytes ("0,0\n"); 32 is far beyond any real one
        if path.stat().st_size > 32 * MAX_LABEL_ROWS:
            raise DataError(
                f"annotation file {path} is {path.stat().st_size:,} bytes, far more than "
                f"{MAX_LABEL_ROWS:,} frame rows; it is not an annotation file of one video"
            )
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read annotation file {path}: {exc}") from None
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or lines[0].strip().replace(" ", "").lower() != HEADER:
        first = lines[0].strip() if lines else "<empty file>"
        raise DataError(f"{path}:1: expected the header {HEADER!r}, found {first!r}")
    if len(lines) - 1 > MAX_LABEL_ROWS:
        raise DataError(
            f"{path} has {len(lines) - 1:,} frame rows, more than {MAX_LABEL_ROWS:,}; it is not "
            "an annotation file of one video"
        )
    values = np.zeros((len(lines) - 1, 2), dtype=np.float32)
    mask = np.ones(len(lines) - 1, dtype=bool)
    for k, line in enumerate(lines[1:]):
        parts = line.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            v, a = float(parts[0]), float(parts[1])
        except ValueError:
            raise DataError(
                f"{path}:{k + 2}: expected two comma-separated numbers, found {line.strip()!r}"
            ) from None
        if v == UNLABELLED or a == UNLABELLED:
            mask[k] = False
            continue
        if not (-1.0 <= v <= 1.0 and -1.0 <= a <= 1.0):
            raise DataError(
                f"{path}:{k + 2}: values must be in [-1, 1] or -5 (unannotated), found "
                f"{line.strip()!r}"
            )
        values[k] = (v, a)
    if not len(mask):
        raise DataError(f"{path}: header but no frame rows")
    return Labels(values, mask, path)


def read_test_list(
    path: Path, labelled: Mapping[str, Path], sets: AnnotationSets, param: str
) -> list[str]:
    """The trials of a test list (:func:`read_name_list`); refused when the file is missing or
    names a trial with an annotation file in ``labelled`` (its "test" scores would be computed
    on training or validation labels). ``sets``: the annotation folders, named in the message;
    ``param``: the recipe path that sets the file."""
    if not path.is_file():
        raise DataError(
            f"test list {path} does not exist or is not a file; set {param} to the organisers' "
            "test set release list"
        )
    names = read_name_list(path)
    leaked = [t for t in names if t in labelled]
    if leaked:
        shown = first_few(leaked)
        raise DataError(
            f"test list {path} names trial(s) that have an annotation file in {sets.train} or "
            f"{sets.val}: {shown}; test trials must be unlabelled (their 'test' scores would "
            "be computed on training or validation labels): remove these names "
            "from the test list (or, if they are test videos, their annotation files)"
        )
    return names


def read_name_list(path: Path) -> list[str]:
    """Video names, one per line (blank lines and ``#`` comments ignored; a ``.txt`` or media
    extension and a header line ``video``/``name`` are tolerated)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read video list {path}: {exc}") from None
    names: list[str] = []
    for line in lines:
        item = line.split("#", 1)[0].strip().strip(",")
        if not item or item.lower() in {"video", "name", "videos", "video_name"}:
            continue
        stem = Path(item).stem if Path(item).suffix.lower() in {".txt", *MEDIA_SUFFIXES} else item
        names.append(stem)
    if not names:
        raise DataError(f"video list {path} names no video")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"video list {path} names {first_few(dup)} more than once")
    return names


def require_submission_template(path: Path, relative_to: str) -> None:
    """Refuse a ``submission_template`` that is not a file (checked at validation, cheaply);
    ``relative_to`` says where a relative path is read."""
    if not path.is_file():
        raise DataError(
            f"data.params.submission_template: {path} does not exist or is not a file; set it "
            f"to the organisers' sample prediction file (a relative path is read {relative_to})"
        )


def read_submission_template(path: Path) -> dict[str, list[tuple[str, int]]]:
    """The organisers' sample prediction file: ``image_location,...`` then
    ``<video>/<frame>.jpg,...`` rows. Returns video -> ``(row name, 0-based frame)`` in file
    order. The organisers list each video's rows together; a video whose rows resume after
    another video's is warned about (its rows are then written together)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read submission template {path}: {exc}") from None
    if not lines or not lines[0].lower().startswith("image_location"):
        raise DataError(f"{path}:1: expected a header starting with 'image_location'")
    out: dict[str, list[tuple[str, int]]] = {}
    last, resumed = "", None
    for k, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        loc = line.split(",", 1)[0].strip()
        video, _, image = loc.rpartition("/")
        m = _CROP.match(image)
        if not video or m is None or int(m.group(1)) < 1:
            raise DataError(f"{path}:{k}: expected '<video>/<5-digit frame>.jpg', found {loc!r}")
        if video != last and video in out and resumed is None:
            resumed = f"{path}:{k}: the rows of video {video!r} resume after other videos' rows"
        last = video
        out.setdefault(video, []).append((loc, int(m.group(1)) - 1))
    if resumed is not None:
        warnings.warn(
            f"submission template: {resumed}; the prediction file lists each video's rows "
            "together, in the order of the videos' first rows, so its row order differs from "
            "the template's (the rows themselves are the same)",
            stacklevel=2,
        )
    return out


def template_rows(
    template: dict[str, list[tuple[str, int]]] | None,
    path: Path | None,
    split: str,
    names: Sequence[str],
    test_list: Path | None,
) -> dict[str, list[tuple[str, int]]] | None:
    """The rows a submission ``template`` (read from ``path``) defines for ``split`` (of trials
    ``names``): for ``test``, and for any split whose trials it names; None when it defines
    none.

    Raises:
        DataError: naming the template when its videos and the split's trials differ: its
            rows are written exactly, so each of its videos needs a prediction and each
            predicted trial needs its rows.
    """
    if template is None or path is None:
        return None
    if split != "test" and set(template).isdisjoint(names):
        return None
    listed = set(names)
    absent = [v for v in template if v not in listed]
    unlisted = [t for t in names if t not in template]
    if not absent and not unlisted:
        return template
    where = (
        f"test list {test_list}"
        if split == "test" and test_list is not None
        else f"split {split!r}"
    )
    parts = []
    if absent:
        parts.append(f"{len(absent)} template video(s) not in the {where}: {first_few(absent)}")
    if unlisted:
        parts.append(
            f"{len(unlisted)} video(s) of the {where} not in the template: {first_few(unlisted)}"
        )
    raise DataError(
        f"submission template {path} does not match the videos to predict: "
        f"{'; '.join(parts)}; its rows are written exactly, so the template and the "
        f"{where} must name the same videos: use the sample file and the test list of the "
        "same release"
    )


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class AnnotationSets:
    """The annotation folders of one edition: ``train`` and ``val`` paths."""

    base: Path
    train: Path
    val: Path


def _sets_in(folder: Path) -> AnnotationSets | None:
    train = next((folder / n for n in TRAIN_NAMES if (folder / n).is_dir()), None)
    val = next((folder / n for n in VAL_NAMES if (folder / n).is_dir()), None)
    if train is None or val is None:
        return None
    return AnnotationSets(folder, train, val)


def find_annotation_sets(root: Path, explicit: Path | None = None) -> AnnotationSets:
    """Locate the VA annotation folders under ``root`` (both ABAW namings), or check
    ``explicit`` (a folder holding ``Train_Set|Training_Set`` and ``Validation_Set``)."""
    if explicit is not None:
        folder = explicit if explicit.is_absolute() else root / explicit
        sets = _sets_in(folder)
        if sets is None:
            raise DataError(
                f"annotation folder {folder} must hold Train_Set (or Training_Set) and "
                "Validation_Set sub-folders"
            )
        return sets
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    candidates: list[Path] = []
    for pattern in (
        "VA_Estimation_Challenge",
        "*/VA_Estimation_Challenge",
        "*/*/VA_Estimation_Challenge",
        "annotations/VA_Set",
        "*/annotations/VA_Set",
        "VA_Set",
        "*/VA_Set",
    ):
        candidates.extend(p for p in sorted(root.glob(pattern)) if p.is_dir())
    found = [s for s in (_sets_in(c) for c in dict.fromkeys(candidates)) if s is not None]
    if not found:
        raise DataError(
            f"no VA annotations under {root}: expected <root>/<N>th_ABAW_Annotations/"
            "VA_Estimation_Challenge/{Train_Set,Validation_Set}/ or <root>/annotations/VA_Set/"
            "{Train_Set|Training_Set,Validation_Set}/ (or set data.params.annotations)"
        )
    if len(found) > 1:
        listing = ", ".join(str(s.base) for s in found)
        raise DataError(
            f"several VA annotation folders under {root}: {listing}; choose one with "
            "data.params.annotations=PATH"
        )
    return found[0]


def label_files(folder: Path) -> dict[str, Path]:
    """Trial name -> annotation file of one partition folder."""
    files = {p.stem: p for p in sorted(folder.glob("*.txt")) if not p.name.startswith(".")}
    if not files:
        raise DataError(f"annotation folder {folder} holds no .txt files")
    return files


def partition_labels(sets: AnnotationSets) -> dict[str, Path]:
    """Trial name -> annotation file over the train and validation folders of ``sets``; a trial
    labelled in both is refused (it would be validated on the data it trained on)."""
    train, val = label_files(sets.train), label_files(sets.val)
    both = sorted(set(train) & set(val))
    if both:
        raise DataError(
            f"trial(s) {first_few(both)} appear in both {sets.train} and {sets.val} "
            f"({train[both[0]]} and {val[both[0]]}); a trial must be in one partition "
            "only, or it is validated on the data it trained on: remove its annotation "
            "file from the other"
        )
    return {**train, **val}


def index_media(root: Path, video_dirs: Sequence[str]) -> dict[str, Path]:
    """Media stem -> raw video file, searching ``video_dirs`` (under ``root`` or absolute)
    recursively; the first folder listed wins a name found twice (with a warning)."""
    index: dict[str, Path] = {}
    clashes: list[str] = []
    for d in video_dirs:
        folder = Path(d) if Path(d).is_absolute() else root / d
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() not in MEDIA_SUFFIXES or not p.is_file():
                continue
            if p.stem in index:
                clashes.append(f"{p} (using {index[p.stem]})")
                continue
            index[p.stem] = p
    if clashes:
        warnings.warn(
            f"affwild2: {len(clashes)} raw video name(s) found twice: "
            f"{first_few(clashes, sep='; ')}",
            stacklevel=2,
        )
    return index


def find_media(trial: str, index: dict[str, Path], root: Path, video_dirs: Iterable[str]) -> Path:
    """The raw video of ``trial`` (suffix stripped); a DataError names what was searched."""
    base = media_name(trial)
    for key in (base, trial):
        if key in index:
            return index[key]
    where = ", ".join(str(root / d) for d in video_dirs)
    raise DataError(
        f"no raw video for trial {trial!r}: expected {base}.mp4 (or .avi, ...) under {where}; "
        "set data.params.video_dirs if the videos are elsewhere"
    )


#: The file whose presence shows a crop folder numbered from 0 (Aff-Wild2 numbers from 1).
ZERO_CROP = "00000.jpg"


def zero_based_crops_error(folder: Path, name: str = ZERO_CROP) -> DataError:
    """The error for a crop folder holding frame number 0 (``name``): its files are 0-based,
    so every face would sit one frame off its label."""
    return DataError(
        f"face-crop folder {folder} holds {name}, but Aff-Wild2 crops are 1-based (00001.jpg "
        "is frame 0), so this folder is numbered from 0 and every face would be one frame off "
        "its label; renumber its files k -> k + 1 (00000.jpg -> 00001.jpg, ...) and run "
        "`fusionkit extract` again"
    )


def crop_indices(folder: Path) -> dict[int, Path]:
    """0-based frame index -> crop file of a ``cropped_aligned/<trial>/`` folder (files are
    ``%05d.jpg``, 1-based; frames without a face have no file).

    Raises:
        DataError: when the folder does not exist, holds a crop numbered 0 (``00000.jpg``:
            a 0-based folder, whose faces would all be one frame off), two files of one
            frame (``7.jpg`` beside ``00007.jpg``: which one is the face would be chance), or
            images but no crop named as Aff-Wild2 names them (``00001.png``, ``img_1.jpg``:
            the trial would train without a face).
    """
    if not folder.is_dir():
        raise DataError(f"face-crop folder {folder} does not exist")
    out: dict[int, Path] = {}
    others: list[str] = []
    for entry in sorted(folder.iterdir()):
        m = _CROP.match(entry.name)
        if m is None:
            if entry.suffix.lower() in _IMAGE_SUFFIXES:
                others.append(entry.name)
            continue
        if int(m.group(1)) == 0:
            raise zero_based_crops_error(folder, entry.name)
        frame = int(m.group(1)) - 1
        if frame in out:
            raise DataError(
                f"face-crop folder {folder} holds two files of frame {frame + 1}: "
                f"{out[frame].name} and {entry.name}; keep one of them"
            )
        out[frame] = entry
    if others and not out:
        raise DataError(
            f"face-crop folder {folder} holds {len(others)} image(s) ({first_few(others)}) but "
            "no crop named <frame>.jpg (00001.jpg for the first frame): convert or rename "
            "them to JPEG files named by their 1-based frame number"
        )
    return out


# --------------------------------------------------------------------------- splits


def warn_shared_media(
    dataset: str, train: Sequence[str], evaluated: Sequence[str], split: str, stacklevel: int
) -> None:
    """Warn when trials of ``split`` come from the raw video of a training trial (``X_right``
    evaluated, ``X_left`` trained on): the two share the scene and the sound (one audio
    feature array), so the score of ``split`` is optimistic."""
    trained: dict[str, list[str]] = {}
    for t in train:
        trained.setdefault(media_name(t), []).append(t)
    shared = [
        f"{t} ({', '.join(trained[media_name(t)])} in train)"
        for t in evaluated
        if media_name(t) in trained
    ]
    if shared:
        warnings.warn(
            f"{dataset}: {len(shared)} trial(s) of split {split!r} come from the raw video of a "
            f"training trial: {first_few(shared, 8, '; ')}; both sides of a video share its "
            "scene and its sound, so this split's score is optimistic. With folds, another "
            "data.params.split.fold or split.chunks may keep them together.",
            stacklevel=stacklevel + 1,
        )


def fold_split(train: Sequence[str], val: Sequence[str], fold: int, chunks: int = 5):
    """Train / val trial lists of a cross-validation fold (as released, built explicitly).

    The sorted official train trials are cut into ``chunks`` consecutive chunks of
    ``len // chunks`` trials (the last one takes the remainder); the official validation set
    is chunk ``chunks + 1``. Fold ``k`` rolls the chunk list by ``k`` (``np.roll``): the last
    rolled chunk validates and the others train. Fold 0 is the official split; fold 1
    validates on the last train chunk and trains on the official validation set.
    """
    if not 0 <= fold <= chunks:
        raise DataError(f"data.params.split.fold={fold} is out of range 0..{chunks}")
    names = sorted(train)
    if fold and len(names) < chunks:
        raise DataError(
            f"data.params.split.fold={fold}: the {len(names)} train trials cannot be cut into "
            f"{chunks} chunks (data.params.split.chunks); use fold 0 (the official split) or "
            "fewer chunks"
        )
    size = len(names) // chunks
    parts = [names[i * size : (i + 1) * size] for i in range(chunks - 1)]
    parts.append(names[(chunks - 1) * size :])
    parts.append(sorted(val))
    n = len(parts)
    rolled = [parts[(i - fold) % n] for i in range(n)]
    return [t for part in rolled[:-1] for t in part], list(rolled[-1])
