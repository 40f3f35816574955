"""Settings: one frozen object per role, built once from CLI flags and ``MMDISAGG_*`` variables.

Every knob is a dataclass field declared with :func:`knob`. Its CLI flag is ``--field-name`` and
its environment variable ``MMDISAGG_FIELD_NAME``; a flag beats the variable, which beats the
default. A bad value fails at start-up with a :class:`SettingsError` naming the knob and the
value. Nothing else in mmdisagg reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "MMDISAGG_"


class SettingsError(ValueError):
    """A knob has a value mmdisagg cannot run with."""


Check = Callable[[Any], str | None]


def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be >= 0"


def two_or_more(value: int) -> str | None:
    return None if value >= 2 else "must be >= 2"


def power_of_two(value: int) -> str | None:
    return None if value > 0 and value & (value - 1) == 0 else "must be a power of two"


def port(value: int) -> str | None:
    return None if 0 < value < 65536 else "must be a TCP port (1-65535)"


def any_port(value: int) -> str | None:
    """A port, or 0 for 'pick a free one'."""
    return None if 0 <= value < 65536 else "must be a TCP port (0-65535, 0 = any free port)"


def knob(
    default: Any,
    help: str,
    *,
    check: Check | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
) -> Any:
    """Declare a setting. Numbers must be > 0 unless another ``check`` is given."""
    metadata = {"help": help, "check": check, "choices": choices, "secret": secret}
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _knob_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]


def _group_fields(cls: type) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(cls)
    return [
        (f.name, hints[f.name])
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(hints[f.name])
    ]


def _convert(raw: Any, kind: Any) -> Any:
    """Turn a flag or env string into the field's type; raise ValueError with a reason."""
    if typing.get_origin(kind) is tuple:
        items = raw if isinstance(raw, list | tuple) else [s for s in raw.split(",") if s.strip()]
        return tuple(str(item).strip() for item in items)
    if not isinstance(raw, str):
        return raw
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("not a boolean (use 1/0, true/false)")
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ValueError("not an integer") from None
    if kind is float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError("not a number") from None
        if not math.isfinite(value):
            raise ValueError("not a finite number")
        return value
    return raw


def _validate(f: dataclasses.Field, kind: Any, value: Any) -> str | None:
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(choices)}"
    check = f.metadata["check"]
    if check is None and kind in (int, float) and kind is not bool:
        check = positive
    return check(value) if check else None


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per knob of ``cls`` (and of its nested groups); defaults stay unset."""
    for _, group in _group_fields(cls):
        add_arguments(parser, group)
    for f, kind in _knob_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "***" if f.metadata["secret"] and default else default
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {shown!r}]"
        if kind is bool:
            parser.add_argument(
                flag_name(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, nargs="+",
                                help=help_text)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name, default=None, help=help_text,
                                choices=f.metadata["choices"])


def load(cls: type, args: argparse.Namespace | Mapping[str, Any] | None = None,
         environ: Mapping[str, str] | None = None) -> Any:
    """Build ``cls`` from flags (``args``), then ``MMDISAGG_*`` variables, then defaults."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, group in _group_fields(cls):
        values[name] = load(group, given, environ)
    for f, kind in _knob_fields(cls):
        if given.get(f.name) is not None:
            raw, source = given[f.name], flag_name(f.name)
        elif env_name(f.name) in environ:
            raw, source = environ[env_name(f.name)], env_name(f.name)
        else:
            continue
        shown = "***" if f.metadata["secret"] else repr(raw)
        try:
            value = _convert(raw, kind)
        except ValueError as exc:
            raise SettingsError(f"{source}={shown}: {exc}") from None
        problem = _validate(f, kind, value)
        if problem:
            raise SettingsError(f"{source}={shown}: {problem}")
        values[f.name] = value
    return cls(**values)


def _knob_values(settings: Any) -> dict[str, tuple[dataclasses.Field, Any]]:
    values = {}
    for name, _ in _group_fields(type(settings)):
        values.update(_knob_values(getattr(settings, name)))
    for f, _ in _knob_fields(type(settings)):
        values[f.name] = (f, getattr(settings, f.name))
    return values


def to_args(settings: Any, target: type, exclude: tuple[str, ...] = ()) -> list[str]:
    """Flags that give a ``target``-settings process the knobs ``settings`` sets away from their
    defaults, but for ``exclude``. Secrets are left out: pass them in the environment, never
    on a command line."""
    wanted = {flag for flag, *_ in describe(target)} - {flag_name(name) for name in exclude}
    args: list[str] = []
    for name, (f, value) in _knob_values(settings).items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if flag_name(name) not in wanted or f.metadata["secret"] or value == default:
            continue
        if isinstance(value, bool):
            args.append(flag_name(name) if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, tuple):
            args += [flag_name(name), *value]
        else:
            args += [flag_name(name), str(value)]
    return args


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(flag, env var, default, help) for every knob: the source of docs/configuration.md."""
    rows = []
    for _, group in _group_fields(cls):
        rows.extend(describe(group))
    for f, _ in _knob_fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((flag_name(f.name), env_name(f.name), default, f.metadata["help"]))
    return rows


@dataclass(frozen=True)
class PoolSettings:
    block_size: int = knob(128, "tokens per embedding-pool block", check=power_of_two)
    default_blocks: int = knob(
        8, "blocks a language server offers before it knows the prompt length (alloc_default)")
    pool_blocks: int = knob(256, "blocks in each server's embedding pool")

    def __post_init__(self) -> None:
        if self.default_blocks > self.pool_blocks:
            raise SettingsError(
                f"{env_name('default_blocks')}={self.default_blocks} is larger than "
                f"{env_name('pool_blocks')}={self.pool_blocks}: the first window could never fit")


@dataclass(frozen=True)
class NetworkSettings:
    host: str = knob("127.0.0.1", "address every server of this process binds to")
    advertise_host: str = knob(
        "", "address peers use to reach this process (default: --host; set it when binding "
            "0.0.0.0)")
    auth_token: str = knob(
        "", "shared secret every control and bootstrap message must carry (empty: none)",
        secret=True)

    @property
    def reachable_host(self) -> str:
        return self.advertise_host or self.host


@dataclass(frozen=True)
class MooncakeSettings:
    """Knobs of the mooncake data plane (a group of TransferSettings)."""

    mooncake_protocol: str = knob("tcp", "Mooncake transport: rdma between hosts with RDMA NICs, "
                                         "tcp anywhere else", choices=("tcp", "rdma"))
    mooncake_device: str = knob("", "RDMA NICs Mooncake may use, comma-separated (e.g. "
                                    "mlx5_0,mlx5_1); empty = every NIC libibverbs finds")
    mooncake_log_level: str = knob("WARNING", "least severe Mooncake log line printed",
                                   choices=("INFO", "WARNING", "ERROR"))


@dataclass(frozen=True)
class TransferSettings:
    transfer_backend: str = knob("shm", "data plane moving embeddings",
                                 choices=("shm", "tcp", "mooncake"))
    bootstrap_port: int = knob(8998, "encode side: HTTP port where language servers register "
                                     "(0 = any free port)", check=any_port)
    control_port: int = knob(0, "ZeroMQ control port (0 = any free port)", check=any_port)
    data_port: int = knob(0, "tcp data plane: receiving port (0 = any free port)",
                          check=any_port)
    advertise_data_port: int = knob(
        0, "tcp data plane: port senders are told to connect to (0 = the receiving port; set "
           "it when a NAT, port forward or proxy sits in front of --data-port)", check=any_port)
    window_blocks: int = knob(0, "most blocks a language server offers in one window after "
                                 "the first (0 = the whole rest of the prompt)",
                              check=non_negative)
    bootstrap_timeout: float = knob(30.0, "seconds to meet the peer of a request")
    waiting_timeout: float = knob(300.0, "seconds a request's receiver waits for its encoder to "
                                         "start sending, and its sender for a first window")
    transfer_timeout: float = knob(30.0, "seconds a transfer may go without progress")
    heartbeat_interval: float = knob(1.0, "seconds between heartbeats to each peer")
    heartbeat_timeout: float = knob(6.0, "seconds of silence after which a peer is dead")
    mooncake: MooncakeSettings = field(default_factory=MooncakeSettings)

    def __post_init__(self) -> None:
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise SettingsError(
                f"{env_name('heartbeat_timeout')}={self.heartbeat_timeout} must exceed "
                f"{env_name('heartbeat_interval')}={self.heartbeat_interval}")


def absolute_paths(value: tuple[str, ...]) -> str | None:
    relative = [path for path in value if not os.path.isabs(path)]
    return f"must be absolute paths (got {', '.join(relative)})" if relative else None


IMAGE_URL_SCHEMES = ("data", "file", "http", "https")


def image_url_schemes(value: tuple[str, ...]) -> str | None:
    unknown = sorted(set(value) - set(IMAGE_URL_SCHEMES))
    if unknown:
        return f"unknown scheme {', '.join(unknown)} (known: {', '.join(IMAGE_URL_SCHEMES)})"
    return None


@dataclass(frozen=True)
class ModelSettings:
    model_path: str = knob(
        "", "checkpoint folder in Hugging Face layout (config.json, safetensors, tokenizer, "
        "preprocessor_config.json)")
    dtype: str = knob("auto", "dtype of weights and activations; auto = the checkpoint's own",
                      choices=("auto", "float32", "bfloat16", "float16"))
    device: str = knob("cpu", "torch device a model half runs on (cpu, cuda, cuda:1, ...)")
    served_model_name: str = knob("", "model name clients use (default: the checkpoint folder's "
                                      "name)")
    max_model_len: int = knob(
        0, "most tokens (prompt + output) per request; 0 = the model's max_position_embeddings",
        check=non_negative)

    @property
    def name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model_path))

    def require_path(self) -> str:
        if not self.model_path:
            raise SettingsError(f"{flag_name('model_path')} (or {env_name('model_path')}) is "
                                "required: a checkpoint folder")
        if not os.path.isfile(os.path.join(self.model_path, "config.json")):
            raise SettingsError(f"{flag_name('model_path')}={self.model_path!r}: no config.json "
                                "there; not a checkpoint folder")
        return self.model_path


@dataclass(frozen=True)
class ImageSettings:
    max_images_per_request: int = knob(8, "images one request may carry")
    max_image_pixels: int = knob(
        64 * 1024 * 1024, "largest image (or video frame) accepted, in pixels before resizing; "
        "checked before decoding, so decompression bombs fail fast")
    max_image_bytes: int = knob(20 * 1024 * 1024, "largest encoded image accepted, in bytes")
    max_videos_per_request: int = knob(2, "videos one request may carry", check=non_negative)
    max_video_bytes: int = knob(64 * 1024 * 1024, "largest encoded video accepted, in bytes")
    max_video_seconds: float = knob(
        600.0, "longest video accepted, in seconds (from its header, before decoding)")
    max_video_frames: int = knob(
        64, "most frames sampled from one video (the video processor's max_frames): a longer "
            "video is sampled more sparsely than the checkpoint's fps", check=two_or_more)
    image_fetch_timeout: float = knob(10.0, "seconds allowed to download one http(s) image or "
                                            "video")
    allowed_url_schemes: tuple[str, ...] = knob(IMAGE_URL_SCHEMES,
                                                "image and video URL schemes accepted",
                                                check=image_url_schemes)
    allowed_local_media_dirs: tuple[str, ...] = knob(
        (), "folders file:// image and video URLs may read from; none = file:// refused",
        check=absolute_paths)
    deny_private_image_urls: bool = knob(
        False, "refuse http(s) image URLs whose host is not a public address (loopback, "
               "private, link-local, ...), redirects included; turn on in production, where "
               "a client must not make the server fetch from its own network")
    image_cache_bytes: int = knob(
        256 * 1024 * 1024, "bytes of vision embeddings the encode server keeps in its LRU image "
        "cache; 0 = no cache", check=non_negative)
    prepared_image_cache_bytes: int = knob(
        256 * 1024 * 1024, "bytes of processed pixels the encode server keeps, by the image's "
        "bytes, so that an image sent again (each turn of a chat) is not decoded and "
        "preprocessed again; 0 = no cache", check=non_negative)


# generation_config.json fields that become sampling defaults (vLLM's list).
GENERATION_CONFIG_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                          "max_new_tokens")


def generation_overrides(value: str) -> str | None:
    if not value:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        return f"not JSON: {exc}"
    if not isinstance(parsed, dict):
        return "must be a JSON object, e.g. '{\"temperature\": 0.7}'"
    unknown = sorted(set(parsed) - set(GENERATION_CONFIG_KEYS))
    if unknown:
        return f"unknown key {', '.join(unknown)} (known: {', '.join(GENERATION_CONFIG_KEYS)})"
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in parsed.values()):
        return "values must be numbers"
    return None


@dataclass(frozen=True)
class GenerationSettings:
    generation_config: str = knob(
        "auto", "sampling defaults for fields a request leaves out: auto = the checkpoint's "
        "generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, "
        "max_new_tokens), none = mmdisagg's neutral defaults", choices=("auto", "none"))
    override_generation_config: str = knob(
        "", "JSON object of sampling defaults that replace the checkpoint's, e.g. "
        "'{\"temperature\": 0.7}'", check=generation_overrides)

    @property
    def overrides(self) -> dict[str, float]:
        return json.loads(self.override_generation_config or "{}")
BYTE_UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
              "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_bytes(text: str) -> int:
    """``4GiB``, ``512MiB``, ``1.5GB``, ``1048576`` -> bytes; ValueError with the reason."""
    stripped = text.strip()
    number = stripped.rstrip("".join({c for unit in BYTE_UNITS for c in unit}))
    unit = stripped[len(number):].strip()
    if unit not in BYTE_UNITS:
        raise ValueError(f"unknown unit {unit!r} (use one of "
                         f"{', '.join(unit for unit in BYTE_UNITS if unit)})")
    try:
        value = float(number)
    except ValueError:
        raise ValueError("not a size (e.g. 4GiB, 512MiB)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("not a size (e.g. 4GiB, 512MiB)")
    return int(value * BYTE_UNITS[unit])


def byte_size(value: str) -> str | None:
    try:
        return None if parse_bytes(value) > 0 else "must be more than 0 bytes"
    except ValueError as exc:
        return str(exc)


def fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be in [0, 1]"


@dataclass(frozen=True)
class EngineSettings:
    max_prefill_tokens: int = knob(
        2048, "prompt tokens the language engine prefills per step, counting each chunk as long "
        "as the step's longest (attention pads them); longer prompts take several steps while "
        "others keep decoding")
    max_prefill_kv_tokens: int = knob(
        32768, "cached tokens one prefill step gathers for its attention: its chunks times the "
        "longest context among them (bounds that step's padded workspace; a step always takes "
        "one chunk, whatever its context)")
    kv_block_size: int = knob(16, "tokens per block of the paged KV cache", check=power_of_two)
    kv_cache_memory: str = knob(
        "4GiB", "memory of the language server's paged KV cache (units B, KiB, MiB, GiB, ...); "
        "on CPU half of it holds the decoding rows' keys and values again, in attention's layout "
        "(the decode workspace); on CUDA used only when --gpu-memory-utilization is 0",
        check=byte_size)
    gpu_memory_utilization: float = knob(
        0.9, "CUDA: fraction of the device's memory for weights, activations and the KV cache "
             "(sized by a dry run at start); 0 = use --kv-cache-memory", check=fraction)
    prefill_while_arriving: bool = knob(
        True, "a language server prefills a prompt's first rows while the rest are still on "
        "their way (an encode server sends each vision forward's rows as it ends); "
        "--no-prefill-while-arriving waits for the whole prompt (Qwen3-VL always does)")
    prefix_cache: bool = knob(
        True, "keep the KV of prompts' whole blocks to reuse for later prompts that start the "
        "same way (a cached prefix is neither encoded, sent nor prefilled again); "
        "--no-prefix-cache turns it off")

    @property
    def kv_cache_bytes(self) -> int:
        return parse_bytes(self.kv_cache_memory)


def urls(value: tuple[str, ...]) -> str | None:
    bad = [u for u in value if not u.startswith(("http://", "https://"))]
    return f"must be http(s):// URLs (got {', '.join(bad)})" if bad else None


@dataclass(frozen=True)
class ProcessSettings:
    torch_threads: int = knob(0, "torch intra-op threads (0 = torch's default)",
                              check=non_negative)
    log_level: str = knob("info", "log level", choices=("debug", "info", "warning", "error"))

    def apply(self, role: str) -> None:
        """Set up this process: logging, and torch's thread count."""
        import logging

        import torch
        logging.basicConfig(level=self.log_level.upper(),
                            format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)


@dataclass(frozen=True)
class EncodingSettings:
    max_encode_batch: int = knob(16, "most requests whose images share one vision forward")
    max_encode_patches: int = knob(
        2048, "most image patches in one vision forward (a larger image still goes alone): a "
              "prompt with more takes several, each forward's rows sent (and prefilled) while "
              "the next runs; bounds how long text prompts and the next step wait behind it")
    max_queued_encodes: int = knob(1024, "requests an encode server holds (preparing, waiting "
                                         "for a window, encoding, sending) beyond which new "
                                         "ones get 503")


@dataclass(frozen=True)
class EncodeServerSettings:
    port: int = knob(8001, "HTTP port of the encode server's API", check=port)
    encoding: EncodingSettings = field(default_factory=EncodingSettings)
    process: ProcessSettings = field(default_factory=ProcessSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    image: ImageSettings = field(default_factory=ImageSettings)


@dataclass(frozen=True)
class LanguageServerSettings:
    port: int = knob(8002, "HTTP port of the language server's API", check=port)
    max_running_requests: int = knob(64, "most requests decoding together")
    max_queued_requests: int = knob(4096, "requests waiting beyond which new ones get 503")
    process: ProcessSettings = field(default_factory=ProcessSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)


@dataclass(frozen=True)
class RouterSettings:
    port: int = knob(8000, "HTTP port of the OpenAI-compatible API", check=port)
    encode: tuple[str, ...] = knob((), "encode server URLs (http://host:port)", check=urls)
    language: tuple[str, ...] = knob((), "language server URLs (http://host:port)", check=urls)
    api_key: str = knob("", "key clients must send as 'Authorization: Bearer KEY' (empty: none)",
                        secret=True)
    health_interval: float = knob(2.0, "seconds between health checks of each server")
    encode_retries: int = knob(2, "other servers tried when an encoder fails before sending "
                                  "or a language server fails before its first token",
                               check=non_negative)
    request_timeout: float = knob(600.0, "seconds a request may take end to end")
    max_request_bytes: int = knob(64 * 1024 * 1024, "largest request body accepted")
    default_max_tokens: int = knob(1024, "max_tokens of a request that sets none")
    process: ProcessSettings = field(default_factory=ProcessSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)

    def __post_init__(self) -> None:
        for name in ("encode", "language"):
            if not getattr(self, name):
                raise SettingsError(f"{flag_name(name)} (or {env_name(name)}) needs at least one "
                                    "server URL")


@dataclass(frozen=True)
class ServeSettings:
    port: int = knob(8000, "HTTP port of the OpenAI-compatible API", check=port)
    encoders: int = knob(1, "encode servers to start")
    language_servers: int = knob(1, "language servers to start")
    colocated: bool = knob(False, "serve from one process running both halves, no transfer "
                                  "(the baseline)")
    api_key: str = knob("", "key clients must send as 'Authorization: Bearer KEY' (empty: none)",
                        secret=True)
    default_max_tokens: int = knob(1024, "max_tokens of a request that sets none")
    max_request_bytes: int = knob(64 * 1024 * 1024, "largest request body accepted")
    encoding: EncodingSettings = field(default_factory=EncodingSettings)
    cache_dir: str = knob("~/.cache/mmdisagg", "where the default tiny checkpoint is built once")
    startup_timeout: float = knob(300.0, "seconds every server gets to come up, at the start "
                                         "and after each restart (one still silent then is "
                                         "killed and counts as a death)")
    health_interval: float = knob(2.0, "seconds between the router's health checks of each "
                                       "server (how soon it sees one die or come back)")
    restart_limit: int = knob(
        5, "deaths of one server, without it staying up --restart-window seconds in between, "
           "that stop the whole service (each death before that restarts it)")
    restart_window: float = knob(60.0, "seconds a restarted server must stay up for its "
                                       "earlier deaths to be forgiven")
    process: ProcessSettings = field(default_factory=ProcessSettings)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    image: ImageSettings = field(default_factory=ImageSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)


ROLE_SETTINGS = {
    "mmdisagg serve / demo": ServeSettings,
    "mmdisagg encode": EncodeServerSettings,
    "mmdisagg language": LanguageServerSettings,
    "mmdisagg router": RouterSettings,
}


def markdown() -> str:
    """docs/configuration.md, from the knobs themselves (a test keeps the file in sync)."""
    lines = ["# Configuration", "",
             "Every knob is a command-line flag and an environment variable; a flag beats the "
             "variable, which beats the default. A bad value stops the command at start-up "
             "with a message naming the knob. `mmdisagg serve` hands the knobs it was given "
             "to the servers it starts; secrets (`--auth-token`, `--api-key`) travel in the "
             "environment, never on a command line.", "",
             "Generated from `mmdisagg/config.py` by `python -m mmdisagg.config`.", ""]
    for command, cls in ROLE_SETTINGS.items():
        lines += [f"## `{command}`", "", "| flag | environment | default | meaning |",
                  "|---|---|---|---|"]
        for flag, env, default, help_text in describe(cls):
            shown = ", ".join(default) if isinstance(default, tuple) else default
            lines.append(f"| `{flag}` | `{env}` | `{shown}` | {help_text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
