"""Everything a plugin author needs, in one namespace.

A plugin registers components from a hook::

    from fusionkit import plugin
    from my_package import fusion, gate

    @plugin.hookimpl
    def fusionkit_register_components(registry: plugin.Registry) -> None:
        registry.add_module(fusion, gate)

and marks each build function next to its component::

    @plugin.register("fusion", "mylab_residual")
    def build_residual(params: ResidualParams, *, in_dims: dict[str, int]) -> ResidualFusion:
        \"\"\"Per-frame fusion refined by residual MLP steps.\"\"\"
        return ResidualFusion(params, in_dims)

This module re-exports, from the rest of fusionkit (which is private to fusionkit):

* registration: :func:`hookimpl`, :func:`register`, :class:`Registry`, :class:`Kind`;
* params: :class:`Params` (the base of params models), :class:`EmptyParams`,
  :class:`ComponentSpec` (a component chosen inside params);
* interfaces: the protocols of every kind and the records they exchange (:class:`Video`,
  :class:`GateOutput`, ...);
* errors: :class:`ShapeError`, :class:`DataError`, ..., :func:`one_line` and
  :func:`first_few` to keep the messages of such errors on one line;
* building blocks: padding-aware layers, :func:`check_shape`, :func:`xavier_init_`;
* perturbation helpers: :func:`video_generator`, :func:`with_features`, ...;
* files and processes: atomic writes and safetensors helpers for datasets that cache
  features, :func:`die_with_parent` and :func:`available_cores` for worker processes,
  :class:`TaskProgress` for long work (bars on a terminal, plain lines in logs);
* the conformance kit: :func:`check_component`, :func:`check_fusion`, ...,
  :func:`host_syncs` and :func:`simulated_host_syncs` (also
  :mod:`fusionkit.testing`).

See docs/plugins.md.
"""

from __future__ import annotations

from fusionkit.core.errors import (
    CheckpointError,
    DataError,
    FusionkitError,
    PluginError,
    RecipeError,
    ShapeError,
    one_line,
)
from fusionkit.core.hookspecs import hookimpl
from fusionkit.core.interfaces import (
    CausalEncoder,
    Dataset,
    DatasetBuild,
    Encoder,
    EncoderBuild,
    Extractable,
    ExtractReport,
    FeatureIdentity,
    FrameLocal,
    Fusion,
    FusionBuild,
    Gate,
    GateBuild,
    GateOutput,
    Head,
    HeadBuild,
    MediaFeatures,
    NamedSteps,
    Perturbation,
    PerturbationBuild,
    StreamingEncoder,
    SubmissionFrames,
    Video,
    ZScoreDefault,
)
from fusionkit.core.params import EmptyParams, Params, first_few
from fusionkit.core.recipe import ComponentSpec
from fusionkit.core.registry import Kind, Registry, register
from fusionkit.engine.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cast_like,
    load_tensors,
    non_finite_tensor,
    save_tensors,
    state_dict_mismatch,
)
from fusionkit.engine.perturb import (
    check_modalities,
    shift_index,
    stream_generator,
    video_generator,
    with_features,
    with_moved_frames,
)
from fusionkit.engine.progress import TaskProgress
from fusionkit.engine.runs import run_or_grid_holding
from fusionkit.engine.session import available_cores
from fusionkit.engine.workers import die_with_parent
from fusionkit.layers import (
    check_mask,
    check_shape,
    check_shapes,
    masked_batch_norm,
    reverse_padded,
    run_lstm,
    shifted_bilstm,
    xavier_init_,
)
from fusionkit.testing import (
    check_component,
    check_dataset,
    check_encoder,
    check_fusion,
    check_gate,
    check_head,
    check_perturbation,
    host_syncs,
    simulated_host_syncs,
)

__all__ = [
    "CausalEncoder",
    "CheckpointError",
    "ComponentSpec",
    "DataError",
    "Dataset",
    "DatasetBuild",
    "EmptyParams",
    "Encoder",
    "EncoderBuild",
    "ExtractReport",
    "Extractable",
    "FeatureIdentity",
    "FrameLocal",
    "Fusion",
    "FusionBuild",
    "FusionkitError",
    "Gate",
    "GateBuild",
    "GateOutput",
    "Head",
    "HeadBuild",
    "Kind",
    "MediaFeatures",
    "NamedSteps",
    "Params",
    "Perturbation",
    "PerturbationBuild",
    "PluginError",
    "RecipeError",
    "Registry",
    "ShapeError",
    "StreamingEncoder",
    "SubmissionFrames",
    "TaskProgress",
    "Video",
    "ZScoreDefault",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "available_cores",
    "cast_like",
    "check_component",
    "check_dataset",
    "check_encoder",
    "check_fusion",
    "check_gate",
    "check_head",
    "check_mask",
    "check_modalities",
    "check_perturbation",
    "check_shape",
    "check_shapes",
    "die_with_parent",
    "first_few",
    "hookimpl",
    "host_syncs",
    "load_tensors",
    "masked_batch_norm",
    "non_finite_tensor",
    "one_line",
    "register",
    "reverse_padded",
    "run_lstm",
    "run_or_grid_holding",
    "save_tensors",
    "shift_index",
    "shifted_bilstm",
    "simulated_host_syncs",
    "state_dict_mismatch",
    "stream_generator",
    "video_generator",
    "with_features",
    "with_moved_frames",
    "xavier_init_",
]
