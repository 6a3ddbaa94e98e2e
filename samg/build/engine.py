"""Building TensorRT / TensorRT-RTX engines from an export folder, with an engine cache.

One engine per component (text_encoder, denoiser, vae_decoder), written to `DIR/engines/` as
`<component>.engine` with its record `<component>.engine.json` beside it (samg.contract's
EngineRecord, written and verified there). The record holds the cache key: ONNX content hash,
TensorRT flavour and version, GPU compute capability ("any" for an ahead-of-time TensorRT-RTX
build) and the build flags (precision, combine path, profiles). A rebuild with the same key reuses
the engine in place or from the engine cache folder.

Networks are strongly typed (TensorRT-RTX has no other kind), so precision comes from the ONNX
dtypes; a requested precision that differs from the export's dtype is refused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from samg.build.loader import (
    CAPTURE_BUILD_FLAGS,
    COMBINE_PATHS,
    PRECISIONS,
    cache_root,
    flavour_of,
    gpu_compute_capability,
    load_trt,
    make_logger,
    polygraphy_trt,
)
from samg.build.profiles import ShapeRequest, input_profiles, symbol_ranges
from samg.contract import (
    ENGINE_COMPONENTS as COMPONENTS,
    ENGINES_DIR,
    NO_RUNTIME,
    EngineRecord,
    Export,
    engine_cache_key,
    engine_record_path,
    read_engine_record,
    verify_engine,
    write_engine_record,
)
from samg.errors import SamgError, check, require
from samg.io import atomic_write_bytes, sha256_file

PLUGIN_ID = "samg::GuidanceCombine"


@dataclass
class BuildOptions:
    flavour: str | None = None  # "tensorrt" | "tensorrt-rtx" | None (auto)
    combine: str = COMBINE_PATHS[0]  # the ONNX function body
    precision: str | None = None  # None: the export's dtype
    shapes: ShapeRequest = field(default_factory=ShapeRequest)
    components: tuple[str, ...] = COMPONENTS
    out_dir: Path | None = None  # default: DIR/engines (ENGINES_DIR)
    cache_dir: Path | None = None  # default: <samg cache>/engines
    timing_cache: Path | None = None  # default: <cache dir>/timing-<flavour>-<version>.cache
    use_cache: bool = True
    quiet: bool = False
    cuda_graph: bool = False  # engines whose runs can be captured (TensorRTRunner(cuda_graph=True))


@dataclass
class BuildResult:
    component: str
    engine_path: Path
    record: EngineRecord
    status: str  # "built" | "up-to-date" | "from-cache"
    seconds: float

    @property
    def cache_hit(self) -> bool:
        return self.status != "built"


def make_progress_monitor(trt: ModuleType, label: str):
    """A trt.IProgressMonitor showing the builder's top-level phases as tqdm bars on stderr."""
    from tqdm import tqdm

    class PhaseBars(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:  # nested phases would only flicker
                self.bars[phase_name] = tqdm(
                    total=num_steps, desc=f"samg build: {label}: {phase_name}", leave=False, file=sys.stderr
                )

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return PhaseBars()


# --------------------------------------------------------------------------------------------
# Reading the export.


def load_export(export_dir: Path) -> Export:
    """The export's validated manifest (samg.contract.read_export), its files checked against their
    hashes; text encoder and VAE may be absent (`samg build` builds the graphs there are)."""
    from samg.contract import read_export

    return read_export(export_dir, complete=False)


def component_graph(export: Export, component: str):
    """The manifest's graph an engine component is built from (the VAE's is `vae`)."""
    return {"text_encoder": export.text_encoder, "denoiser": export.denoiser, "vae_decoder": export.vae}[component]


def component_files(export: Export, export_dir: Path) -> dict[str, Path]:
    """component -> ONNX file, for the components this export has as ONNX graphs."""
    files = {}
    for component in COMPONENTS:
        graph = component_graph(export, component)
        if graph.file and graph.runtime != NO_RUNTIME:
            files[component] = export_dir / graph.file
    return files


def declared_inputs(export: Export, component: str):
    """The input shapes the manifest declares for a component's graph (the text encoder declares none)."""
    return getattr(component_graph(export, component), "inputs", None)


def onnx_input_dims(model) -> dict[str, list[int | str | None]]:
    """Graph inputs (not initializers) -> dims: int when fixed, dim_param (or None) when not."""
    initializers = {init.name for init in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = []
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or None)
        shapes[value.name] = dims
    return shapes


def external_data_files(model, onnx_path: Path) -> list[Path]:
    """Files holding the model's external weights (top-level initializers, as exporters write them)."""
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == 1:  # onnx.TensorProto.EXTERNAL
            locations.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return [onnx_path.parent / loc for loc in sorted(locations)]


def uses_combine(model) -> bool:
    from samg.op.schema import DOMAIN, OP_TYPE

    return any(node.domain == DOMAIN and node.op_type == OP_TYPE for node in model.graph.node)


def check_precision(dtype: str, precision: str | None) -> str:
    """The precision to build (fp32/fp16/bf16): the export's dtype (Export.dtype, one of
    samg.contract.DTYPES, so it has one); a different request is refused."""
    export_precision = {v: k for k, v in PRECISIONS.items()}[dtype]
    if precision is None:
        return export_precision
    check(precision in PRECISIONS, f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    check(
        precision == export_precision,
        f"--precision {precision} does not match the export's dtype {dtype}: TensorRT networks are strongly "
        f"typed and take precision from the ONNX dtypes; re-export with `samg export --dtype {PRECISIONS[precision]}` "
        f"or build with --precision {export_precision}",
    )
    return precision


# --------------------------------------------------------------------------------------------
# What an engine is built for (part of its cache key).


def compute_capability(trt: ModuleType) -> str:
    """"any" for TensorRT-RTX ahead-of-time builds; the GPU's "sm_XY" for standard TensorRT."""
    if flavour_of(trt) == "tensorrt-rtx":
        return "any"
    return gpu_compute_capability() or "unknown"


# --------------------------------------------------------------------------------------------
# Parsing and building.


def parse_network(trt: ModuleType, builder, logger, onnx_path: Path, combine: str):
    """Parse `onnx_path` into a strongly typed network; for `combine="plugin"` from a copy without
    the GuidanceCombine function body, so the parser maps the node to the registered plugin.

    Returns (network, parser): the parser must outlive the network's use.
    """
    from samg.build.plugin import register_plugin

    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    mark = logger.mark()
    if combine == "plugin":
        register_plugin(trt)
        with _stripped_copy(onnx_path) as stripped:
            ok = parser.parse_from_file(str(stripped))
    else:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        detail = "\n".join(f"  [parser] {e}" for e in errors) or logger.report(mark)
        raise SamgError(f"TensorRT could not parse {onnx_path.name}:\n{detail}")
    return network, parser


def _describe_parser_error(error) -> str:
    """"node NAME (OP): message" from an IParserError (the node is what the user can act on)."""
    where = []
    for getter in ("node_name", "node_operator"):
        value = getattr(error, getter, None)
        value = value() if callable(value) else value
        where.append(str(value) if value else "")
    name, operator = where
    prefix = f"node {name or '?'} ({operator}): " if operator else ""
    return prefix + error.desc().strip()


class _stripped_copy:
    """A temporary copy of an ONNX file with the GuidanceCombine body removed.

    Written to a temporary folder, or next to the original when the model keeps its weights in
    external files (so that their relative paths still resolve).
    """

    def __init__(self, onnx_path: Path):
        self.onnx_path = onnx_path
        self.folder: tempfile.TemporaryDirectory | None = None
        self.path: Path | None = None

    def __enter__(self) -> Path:
        onnx = require("onnx", "to prepare the plugin path")
        from samg.op import function as op_function

        model = onnx.load(str(self.onnx_path), load_external_data=False)
        op_function.strip_function(model)
        if external_data_files(model, self.onnx_path):
            fd, name = tempfile.mkstemp(prefix=f".{self.onnx_path.stem}.plugin-", suffix=".onnx", dir=self.onnx_path.parent)
            os.close(fd)
            self.path = Path(name)
        else:
            self.folder = tempfile.TemporaryDirectory(prefix="samg-plugin-")
            self.path = Path(self.folder.name) / self.onnx_path.name
        self.path.write_bytes(model.SerializeToString())
        return self.path

    def __exit__(self, *exc) -> None:
        if self.folder is not None:
            self.folder.cleanup()
        elif self.path is not None:
            self.path.unlink(missing_ok=True)


def plugin_layer_count(trt: ModuleType, network) -> int:
    plugin_types = {getattr(trt.LayerType, n) for n in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, n)}
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in plugin_types)


def network_io(network) -> tuple[list[str], list[str]]:
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    return inputs, outputs


def build_serialized(
    trt: ModuleType,
    builder,
    network,
    logger,
    profiles: dict[str, dict[str, list[int]]],
    timing_cache: Path | None,
    name: str,
    progress: bool = False,
    build_flags: tuple[str, ...] = (),
) -> bytes:
    """Build the engine with polygraphy (config, profile, timing cache read before and merged back after).

    `builder` and `network` are ours so that TensorRT's messages land in `logger` for the report.
    `build_flags`: trt.BuilderFlag names set on top of polygraphy's config.
    """
    polygraphy = polygraphy_trt(trt)
    from polygraphy.exception import PolygraphyException

    profile = polygraphy.Profile()
    inputs, _ = network_io(network)
    for input_name in inputs:
        check(input_name in profiles, f"{name}: the network input {input_name!r} has no profile (internal mismatch)")
        shapes = profiles[input_name]
        profile.add(input_name, shapes["min"], shapes["opt"], shapes["max"])
    cache = str(timing_cache) if timing_cache is not None else None  # a missing file starts an empty cache
    if cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
    config = polygraphy.CreateConfig(
        profiles=[profile], load_timing_cache=cache,
        progress_monitor=make_progress_monitor(trt, name) if progress else None,
    )
    if build_flags:
        def set_flags(_builder, _network, builder_config):
            for flag in build_flags:
                builder_config.set_flag(getattr(trt.BuilderFlag, flag))

        config = polygraphy.PostprocessConfig(config, set_flags)
    mark = logger.mark()
    try:
        with warnings.catch_warnings():  # polygraphy always sets a timing cache, which TensorRT-RTX deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            return bytes(polygraphy.engine_bytes_from_network((builder, network), config=config, save_timing_cache=cache))
    except PolygraphyException:
        raise SamgError(f"TensorRT could not build the {name} engine:\n{logger.report(mark)}") from None


# --------------------------------------------------------------------------------------------
# The whole export.


def _say(options: BuildOptions, text: str) -> None:
    if not options.quiet:
        print(f"samg build: {text}", file=sys.stderr, flush=True)


def build_export(export_dir: str | os.PathLike, options: BuildOptions | None = None) -> list[BuildResult]:
    """Build (or reuse from cache) one engine per component of an export folder."""
    options = options or BuildOptions()
    onnx = require("onnx", "to read the exported models")
    export_dir = Path(export_dir)
    export = load_export(export_dir)
    check(options.combine in COMBINE_PATHS, f"--combine {options.combine!r}: use one of {', '.join(COMBINE_PATHS)}")
    precision = check_precision(export.dtype, options.precision)  # the plugin's kernels take all three
    trt = load_trt(options.flavour)
    flavour, version = flavour_of(trt), trt.__version__
    files = component_files(export, export_dir)
    unknown = [c for c in options.components if c not in COMPONENTS]
    check(not unknown, f"unknown component(s) {unknown}: choose from {', '.join(COMPONENTS)}")
    wanted = [c for c in COMPONENTS if c in options.components and c in files]
    check(wanted, f"{export_dir} has none of the components {', '.join(options.components)} as ONNX files")

    out_dir = options.out_dir or export_dir / ENGINES_DIR
    cache_dir = options.cache_dir or cache_root() / "engines"
    # TensorRT-RTX builds do no kernel timing (its timing-cache calls are no-ops).
    timing_cache = None
    if flavour == "tensorrt":
        timing_cache = options.timing_cache or cache_dir / f"timing-{flavour}-{version}.cache"
    elif options.timing_cache is not None:
        _say(options, "note: TensorRT-RTX has no timing cache (its builds time no kernels); --timing-cache ignored")
    models = {}
    for component in wanted:
        path = files[component]
        check(path.is_file(), f"{path} is missing from the export: re-run `samg export`")
        models[component] = onnx.load(str(path), load_external_data=False)

    default_tokens = _default_tokens(export, models.get("denoiser"))
    ranges = symbol_ranges(export.latent, options.shapes, default_tokens, vae_frames=export.vae.frame_mode)
    logger = make_logger(trt)
    capability = compute_capability(trt)
    build_flags = CAPTURE_BUILD_FLAGS[flavour] if options.cuda_graph else ()
    results = []
    for component in wanted:
        path, model = files[component], models[component]
        combine = options.combine if component == "denoiser" and uses_combine(model) else "none"
        profiles = input_profiles(component, onnx_input_dims(model), ranges,
                                  declared=declared_inputs(export, component), layout=export.latent.layout)
        hashed = [path, *external_data_files(model, path)]
        build_inputs = dict(
            component=component, onnx_sha256=tuple(sha256_file(p) for p in hashed), trt_flavour=flavour,
            trt_version=version, compute_capability=capability, precision=precision, combine=combine,
            profiles={name: {k: tuple(v) for k, v in p.items()} for name, p in profiles.items()},
            build_flags=build_flags,
        )
        key = engine_cache_key(**build_inputs)
        engine_path = out_dir / f"{component}.engine"
        started = time.perf_counter()
        status = _reuse(engine_path, key, cache_dir) if options.use_cache else None
        if status is None:
            _say(options, f"{component}: building with {flavour} {version} (combine={combine}, {precision}) ...")
            builder = trt.Builder(logger)
            network, _parser = parse_network(trt, builder, logger, path, combine)
            _check_plugin_layers(trt, network, combine, path)
            engine = build_serialized(
                trt, builder, network, logger, profiles, timing_cache, component, progress=not options.quiet,
                build_flags=build_flags,
            )
            inputs, outputs = network_io(network)
            record = EngineRecord(
                key=key, **build_inputs, onnx=path.name, inputs=tuple(inputs), outputs=tuple(outputs),
                plugins=(PLUGIN_ID,) if combine == "plugin" else (), engine_bytes=len(engine),
                engine_sha256="sha256:" + hashlib.sha256(engine).hexdigest(),
                build_seconds=round(time.perf_counter() - started, 3), samg_version=_samg_version(),
            )
            _write_engine(engine_path, engine, record)
            if options.use_cache:
                _store_in_cache(cache_dir, key, engine_path)
            status = "built"
        seconds = time.perf_counter() - started
        record = read_engine_record(engine_path)
        words = {"built": "built", "up-to-date": "cache hit (engine up to date)", "from-cache": "cache hit (copied from the engine cache)"}
        _say(options, f"{component}: {words[status]} in {seconds:.1f} s -> {engine_path}")
        results.append(BuildResult(component, engine_path, record, status, seconds))
    return results


def _default_tokens(export: Export, denoiser_model) -> int | None:
    """Token length L of the denoiser's conditioning when the export leaves it symbolic."""
    declared = (export.denoiser.inputs or {}).get("encoder_hidden_states")
    shape = declared.shape if declared is not None else ()
    if len(shape) >= 2 and isinstance(shape[1], int):
        return shape[1]
    if denoiser_model is not None:
        dims = onnx_input_dims(denoiser_model).get("encoder_hidden_states") or []
        if len(dims) >= 2 and isinstance(dims[1], int):
            return dims[1]
    lengths = [t.max_length for t in export.text_encoder.tokenizers]
    return max(lengths) if lengths else None


def _check_plugin_layers(trt: ModuleType, network, combine: str, path: Path) -> None:
    count = plugin_layer_count(trt, network)
    expected = 1 if combine == "plugin" else 0
    if count != expected:
        raise SamgError(
            f"{path.name}: expected {expected} GuidanceCombine plugin layer(s) for combine={combine}, the parser "
            f"made {count}: re-export with `samg export` (one GuidanceCombine node with its function body)"
        )


def _reuse(engine_path: Path, key: str, cache_dir: Path) -> str | None:
    """"up-to-date" when the engine in place has `key`, "from-cache" when copied from the cache."""
    if _valid_with_key(engine_path, key):
        return "up-to-date"
    cached = cache_dir / f"{key}.engine"
    if _valid_with_key(cached, key):
        _write_engine(engine_path, cached.read_bytes(), read_engine_record(cached))
        return "from-cache"
    return None


def _valid_with_key(engine_path: Path, key: str) -> bool:
    try:
        return verify_engine(engine_path).key == key
    except SamgError:
        return False


def _write_engine(engine_path: Path, engine: bytes, record: EngineRecord) -> None:
    # The record goes last: an engine without a matching record is never taken as valid.
    engine_record_path(engine_path).unlink(missing_ok=True)
    atomic_write_bytes(engine_path, engine)
    write_engine_record(engine_path, record)


def _store_in_cache(cache_dir: Path, key: str, engine_path: Path) -> None:
    try:
        cached = cache_dir / f"{key}.engine"
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            shutil.copyfile(engine_path, Path(tmp) / "e")
            os.replace(Path(tmp) / "e", cached)
        write_engine_record(cached, read_engine_record(engine_path))
    except OSError as exc:
        print(f"samg build: warning: could not store the engine in the cache {cache_dir}: {exc}", file=sys.stderr)


def _samg_version() -> str:
    from samg import __version__

    return __version__
