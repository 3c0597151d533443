"""Grid execution under signals, feature-cache staleness and extraction of grid recipes.

A grid worker stops on the interrupt the grid forwards even when it was started with SIGINT
ignored (a background job of a script), and outcomes sent as the interrupt came are recorded.
``fusionkit extract`` of a grid recipe extracts the data of every point, and a crop rewritten
with other content of the same byte size makes its visual cache stale.
"""

from __future__ import annotations

import textwrap
import time
from fractions import Fraction

import numpy as np
import yaml

from tests.affwild2_fixture import TINY_AUDIO, TINY_VIDEO, MediaSpec, write_jpeg, write_media
from tests.test_grid_trust import run_worker_script

# ----------------------------------------------------------------------------- grid workers

WORKER_SIGINT_IGNORED = textwrap.dedent(
    """
    import os, signal, threading, time
    # A shell script's background job (`fusionkit run grid.yaml -j 2 &`) starts with SIGINT
    # ignored, and every spawned grid worker inherits that disposition across exec.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from fusionkit.studies import grid

    class Pipe:
        def __init__(self):
            self.given = False
        def recv(self):
            if self.given:
                return None
            self.given = True
            return "a recipe"
        def send(self, outcome):
            print("sent", outcome, flush=True)

    def long_point(recipe, threads):  # a point still training: 40 epochs of 0.05 s
        for _ in range(40):
            time.sleep(0.05)
        return {"splits": {}, "best_epoch": 40}

    grid._run_point = long_point
    grid.die_with_parent = lambda: None
    # the grid process passes SIGTERM on to its workers as SIGINT (_run_in_processes)
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    grid._serve(Pipe(), 1)
    """
)


def test_a_grid_worker_started_with_sigint_ignored_stops_on_the_forwarded_interrupt(tmp_path):
    """SIGTERM to a grid reaches its workers as SIGINT: a worker that inherited SIGINT ignored
    still stops at the interrupt and says so (it trained on to the end, and the grid waited)."""
    done = run_worker_script(WORKER_SIGINT_IGNORED, tmp_path)
    assert done.stdout == "sent ('interrupted', 'interrupted')\n", done.stdout + done.stderr


class _Sent:
    """A worker's end of a pipe holding the outcomes it sent."""

    def __init__(self, *outcomes: tuple) -> None:
        self.outcomes = list(outcomes)

    def poll(self) -> bool:
        return bool(self.outcomes)

    def recv(self) -> tuple:
        return self.outcomes.pop(0)


def test_outcomes_sent_as_an_interrupt_came_are_recorded():
    """A point that finished (or failed) just as the grid was interrupted is recorded with
    its outcome, not left pending; an interrupted point and an idle worker record nothing."""
    from fusionkit.studies.grid import _record_sent, _Worker

    pool = [
        _Worker(None, _Sent(("done", {"best_epoch": 3})), "a"),
        _Worker(None, _Sent(("failed", "bad data")), "b"),
        _Worker(None, _Sent(("interrupted", "interrupted")), "c"),
        _Worker(None, _Sent(), "d"),
        _Worker(None, _Sent(("done", {})), None),
    ]
    recorded: list[tuple] = []
    _record_sent(pool, lambda tag, status, payload: recorded.append((tag, status, payload)))
    assert recorded == [("a", "done", {"best_epoch": 3}), ("b", "failed", "bad data")]
    assert all(w.tag is None for w in pool)


# ----------------------------------------------------------------------------- caches


def test_a_rewritten_crop_of_the_same_size_makes_the_visual_cache_stale(tmp_path):
    """A crop rewritten with another face of the same byte size makes the cache stale (its
    modification time changed and the folder's content differs); a touched or copied folder of
    the same files stays valid."""
    import shutil

    import torch

    from fusionkit_affwild2.cache import CacheFolder

    crops = tmp_path / "cropped_aligned" / "vid"
    crops.mkdir(parents=True)
    for k in range(3):
        (crops / f"{k + 1:05d}.jpg").write_bytes(bytes([k]) * 100)
    folder = CacheFolder(tmp_path / "cache", "video", {"name": "face_cnn", "resize": 24})
    folder.write("vid", {"features": torch.ones(3, 2)}, {"crops": crops})
    assert folder.status("vid", {"crops": crops}).valid
    time.sleep(0.01)
    (crops / "00003.jpg").write_bytes(bytes([2]) * 100)  # rewritten, the same bytes
    copy = tmp_path / "copy"
    shutil.copytree(crops, copy)  # new modification times, the same files
    assert folder.status("vid", {"crops": crops}).valid
    assert folder.status("vid", {"crops": copy}).valid
    (crops / "00002.jpg").write_bytes(bytes([9]) * 100)  # another face, same size
    status = folder.status("vid", {"crops": crops})
    assert not status.valid
    assert "content of files changed (same names and sizes)" in str(status.reason)


# ----------------------------------------------------------------------------- extract


def _tiny_tree(root):
    spec = MediaSpec("clip", Fraction(25), 12, burst_frame=3)
    write_media(root / "raw_videos" / "clip.mp4", spec)
    for trial, part in (("clip", "Train_Set"), ("clip_right", "Validation_Set")):
        crops = root / "cropped_aligned" / trial
        crops.mkdir(parents=True)
        for k in range(12):
            write_jpeg(crops / f"{k + 1:05d}.jpg", np.full((24, 24, 3), 40 + 9 * k, np.uint8))
        labels = root / "6th_ABAW_Annotations" / "VA_Estimation_Challenge" / part
        labels.mkdir(parents=True, exist_ok=True)
        rows = "".join(f"{0.05 * k:.2f},0.1\n" for k in range(12))
        (labels / f"{trial}.txt").write_text("valence,arousal\n" + rows)


def test_extract_of_a_grid_recipe_covers_every_points_features(cli, tmp_path):
    """`fusionkit extract` of a grid whose points set other data params extracts the caches
    of every point's data, so that the grid's points find them."""
    root = tmp_path / "aw2"
    _tiny_tree(root)
    recipe = {
        "name": "g",
        "data": {
            "name": "affwild2",
            "params": {
                "root": str(root),
                "audio": {"backbone": TINY_AUDIO},
                "video": {"backbone": TINY_VIDEO, "resize": 24},
                "device": "cpu",
            },
            "window": 8,
            "hop": 4,
        },
        "model": {
            "encoders": {
                "audio": {"name": "linear", "params": {"dim": 4}},
                "video": {"name": "linear", "params": {"dim": 4}},
            },
            "fusion": {"name": "concat"},
            "gate": {"name": "last"},
            "head": {"name": "regression", "params": {"hidden": 4}},
            "targets": ["valence", "arousal"],
        },
        "training": {"epochs": 1, "num_threads": 1},
        "sweep": {"data.params.audio.anchor": ["start", "center"]},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(recipe))
    rc, out, err = cli("extract", path, "-q")
    assert rc == 0, err
    audio_folders = sorted(p.name for p in (root / "fusionkit_cache" / "audio").iterdir())
    assert len(audio_folders) == 2, audio_folders  # one audio cache per anchor
    assert "2 data settings of the grid" in out
    rc, out, err = cli("extract", path, "-q")  # again: every cache of both is valid
    assert rc == 0 and "computed" in out, err
