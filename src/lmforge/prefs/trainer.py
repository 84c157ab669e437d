"""Preference training of a tool-using policy: M-DPO, single-turn DPO, M-KTO and KTO.

    result = train_preferences(policy, tokenizer, data, PrefTrainConfig(loss="m_dpo", output_dir="runs/dpo"))
    result["final_dir"]   # the trained LoRA adapter (a PEFT folder); curves, metrics and report beside it

The data path, from graded rollouts to a loss, in one sitting:

1. ``data`` (:class:`lmforge.prefs.pairs.PreferenceData`) holds M-DPO pairs and M-KTO examples.
   :func:`prepare_batches` shuffles them once (seeded) and cuts them into *fixed* micro-batches of
   ``batch_size``, collated token-exact by :func:`~lmforge.prefs.pairs.collate_pairs` /
   :func:`~lmforge.prefs.pairs.collate_kto`. Multi-turn losses (``m_dpo``, ``m_kto``) score the
   policy's own tokens; single-turn ones (``dpo``, ``kto``) every token after the prompt. Micro-batches
   are fixed because KTO's KL rows pair each trajectory with another prompt *of its batch*: with the
   batches fixed, the reference log-probs of those rows can be computed once too. Epochs shuffle the
   order of the micro-batches.
2. Reference log-probs are computed ONCE, before training, in a separate no-grad pass
   (:func:`compute_reference_logps`) and stored with the batches (``reference_logps.pt`` in the run
   folder, so a resumed run never recomputes them from a half-trained policy). The reference is the
   policy as given (``reference="policy"``: in the iterative loop, the previous iteration's policy),
   the adapter-disabled base model (``reference="base"``, LoRA only), or log-probs the caller computed
   with any other model it loaded and freed (``reference_logps=``). No second model is resident
   during training.
3. Each step, :func:`preference_loss` scores the policy's trajectories through
   :func:`lmforge.models.token_logprobs` (Cut Cross-Entropy: the tokens x vocabulary logits never
   exist), chosen and rejected rows in one forward pass, and feeds the summed log-probs to
   :func:`lmforge.prefs.losses.m_dpo_loss` or :func:`~lmforge.prefs.losses.m_kto_loss`.
4. AdamW, linear warm-up then cosine decay to 0, gradient clipping, gradient accumulation. The loss of
   an optimizer step is the mean over all pairs (KTO: examples) of the step, on every device: each
   micro-batch's mean loss is weighted by its share of the step's pairs.

Why accelerate.Accelerator and not transformers.Trainer: the data are precomputed micro-batches with
their reference log-probs (not a dataset a collator pads), the step is a few lines around one loss
call, evaluation generates whole tool-using trajectories, and checkpoints hold only the trainable
weights and the optimizer. A plain loop keeps all of that readable end to end, and the Accelerator
gives what ``accelerate launch`` needs: the device, DDP (the policy is wrapped in a small module whose
forward returns summed log-probs, so DDP sees the whole computation and synchronises gradients), bf16
autocast, and process coordination. Every process runs the same schedule; process ``r`` of ``W`` takes
micro-batches ``r, r + W, ...`` of each step, so ``W`` processes with ``batch_size`` each train exactly
like one process that sees the same micro-batches. Under FSDP2 (``accelerate launch`` with an FSDP
config) the policy and its optimizer are sharded together, the reference is scored through the sharded
policy, outputs stay float32 and checkpoints hold whole (gathered) tensors; evaluation during training
is not available there (generation would need every rank).

Memory: ``rows_per_forward`` and ``two_pass`` trade time for activation memory (one sequence's, with
exact gradients), ``compile_layers`` compiles each decoder layer; see :class:`PrefTrainConfig` and
docs/benchmarks.md for what each costs on a Gemma-2-2B-shaped model. The lean GPU recipe is
``rows_per_forward=1, two_pass=True, compile_layers=True`` with the model loaded with
``attn_implementation="flex_attention"``: on an H200, 4 pairs x 2048 tokens of a Gemma-2-2B-shaped LoRA
step took 0.47x TRL's peak memory in 0.82x its time.

Precision: bf16 autocast on CUDA devices that support it (``precision="auto"``), float32 on the CPU.
Reference and policy log-probs go through the same path, so at step 0 a policy equal to its reference
has rewards of exactly 0 (with ``two_pass`` or ``compile_layers`` the two passes are different graphs and
bf16 rounding leaves rewards of a few hundredths of a nat).

The run folder (``output_dir``):

    config.yaml           the PrefTrainConfig of the run
    reference_logps.pt    reference log-probs per micro-batch (with a fingerprint of the batches)
    metrics.jsonl         one line per log: loss, reward accuracy and margins, chosen/rejected rewards and
                          log-probs, learning rate, grad norm, step time (and on CUDA the peak allocated memory
                          of the step, on the main process); eval lines carry ``eval/<metric>``
    curves.png            those curves against the optimizer step
    report.md             data, settings and results
    checkpoints/step-N/   trainable weights, optimizer, scheduler, RNG states, log history (newest kept)
    best/                 the model at the best evaluation (when an eval_fn is given)
    final/                the trained model: a PEFT adapter folder for LoRA, a model folder otherwise

Running again on the same folder (``resume=True``) continues from the newest checkpoint bit for bit
(the data order is a function of the seed and the step); a run that already finished trains nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lmforge.config import check_choice, check_int, check_number, check_resumable
from lmforge.files import write_text_atomic
from lmforge.prefs.losses import M_DPO_VARIANTS, m_dpo_loss, m_kto_loss
from lmforge.prefs.pairs import KTOExample, PreferenceData, PreferencePair, collate_kto, collate_pairs

logger = logging.getLogger(__name__)

LOSSES = ("m_dpo", "dpo", "m_kto", "kto")
REFERENCES = ("policy", "base")
FINETUNE_OPTIONS = ("lora", "full")
PRECISION_OPTIONS = ("auto", "bf16", "fp32")
DEFAULT_LEARNING_RATES = {"lora": 2e-5, "full": 5e-7}

CONFIG_FILENAME = "config.yaml"
REFERENCE_FILENAME = "reference_logps.pt"
METRICS_FILENAME = "metrics.jsonl"
PLOT_FILENAME = "curves.png"
REPORT_FILENAME = "report.md"
CHECKPOINTS_DIRNAME = "checkpoints"
BEST_DIRNAME = "best"
FINAL_DIRNAME = "final"
_CHECKPOINT_PREFIX = "step-"
_TRAINABLE_FILENAME = "trainable.safetensors"
_OPTIMIZER_FILENAME = "optimizer.pt"
_STATE_FILENAME = "state.json"
# Options that define what is trained on what; a resumed run must not change them.
_RUN_IDENTITY_FIELDS = ("loss", "beta", "dpo_variant", "label_smoothing", "nll_coef", "normalize",
                        "desirable_weight", "undesirable_weight", "kl_max_length", "reference", "finetune",
                        "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate",
                        "weight_decay", "epochs", "max_steps", "batch_size", "grad_accumulation", "warmup",
                        "seed")


# --------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass
class PrefTrainConfig:
    """Options of :func:`train_preferences` (and of the training stage of ``lmforge mdpo run``).

    Loss:
        loss: "m_dpo" (multi-turn DPO: policy tokens only), "dpo" (single-turn baseline: every token after
            the prompt, tool outputs included), "m_kto" or "kto" (the same two masks for KTO).
        beta: inverse temperature of the implicit reward (for dpo_variant "ipo": the regulariser tau).
        dpo_variant: "sigmoid" (DPO), "ipo" or "hinge"; label_smoothing (cDPO, sigmoid only), nll_coef (an
            NLL term on the chosen trajectories), normalize (length-normalised log-ratios): see
            :func:`lmforge.prefs.losses.m_dpo_loss`.
        desirable_weight, undesirable_weight: KTO's lambda_D and lambda_U.
        kl_max_length: KTO's mismatched KL rows are cut to this many tokens (None: not cut).
        reference: "policy" (the model as given, before training) or "base" (the adapter disabled; LoRA
            only). Ignored when reference log-probs are passed in.

    Model:
        finetune: "lora" (a plain model gets a new LoRA adapter with lora_*; a PEFT model trains its
            adapter) or "full" (every weight of a plain model).
        precision: "auto" (bf16 autocast on CUDA with bf16, float32 on the CPU), "bf16" or "fp32".
        gradient_checkpointing: recompute activations in the backward pass (less memory, slower).
        rows_per_forward: score at most this many sequences per forward pass (None: all rows of a
            micro-batch, chosen and rejected together, in one pass). With gradient checkpointing the
            recomputed activations then follow this many sequences, while the saved layer inputs still
            follow the micro-batch.
        two_pass: score every sequence once without gradients, take the loss's gradient with respect to
            each sequence's summed log-prob, then back-propagate it one chunk of ``rows_per_forward``
            sequences at a time. Gradients are exact (the losses depend on the sequences only through
            those sums); activation memory is that of one chunk; the cost is one extra forward pass.
            Needs rows_per_forward. (With LoRA dropout > 0 the two passes draw different masks.)
        compile_layers: ``torch.compile`` every decoder layer (the classes the model lists in
            ``_no_split_modules``; the CCE head stays as it is). Inductor fuses the layers' elementwise
            work (norms, softcapping, GeGLU, LoRA), which cuts kernel launches (what bounds small
            ``rows_per_forward`` passes) and the activations a layer keeps. The first steps pay the
            compilation (a graph per layer kind, with and without gradients). With gradient_checkpointing
            the trainer checkpoints inside each compiled layer (:func:`checkpoint_decoder_layers`), so the
            backward's recomputation is compiled too.
        cce_impl: implementation of lmforge.cce used for every log-prob ("auto", "torch", "triton").

    Optimisation (AdamW; linear warm-up, then cosine decay to 0):
        learning_rate: None = 2e-5 for LoRA, 5e-7 for full fine-tuning.
        epochs / max_steps: optimizer steps = max_steps when set, else ceil(epochs x steps per epoch).
        batch_size: pairs (KTO: trajectories) per micro-batch per device; grad_accumulation micro-batches
            per device per optimizer step.
        warmup: a fraction of the steps when < 1, else a number of steps.

    Run folder:
        output_dir: the run folder (see the module docstring).
        save_steps: checkpoint every this many optimizer steps (and always at the last one);
            save_total_limit checkpoints are kept.
        eval_steps: call ``eval_fn`` every this many steps (None: only at the end); eval_metric is the key
            of its result that picks the best checkpoint (higher is better).
        logging_steps: write a metrics line every this many steps (means over those steps).
        resume: continue from the newest checkpoint in output_dir; with False, a folder that holds
            checkpoints is an error.
        progress: show a tqdm bar.
    """

    loss: str = "m_dpo"
    beta: float = 0.1
    dpo_variant: str = "sigmoid"
    label_smoothing: float = 0.0
    nll_coef: float = 0.0
    normalize: bool = False
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    kl_max_length: int | None = None
    reference: str = "policy"
    finetune: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    learning_rate: float | None = None
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accumulation: int = 1
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    rows_per_forward: int | None = None
    two_pass: bool = False
    compile_layers: bool = False
    cce_impl: str = "auto"
    seed: int = 0
    output_dir: str = "runs/prefs"
    save_steps: int = 50
    save_total_limit: int = 1
    eval_steps: int | None = None
    eval_metric: str = "accuracy"
    logging_steps: int = 1
    resume: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        from lmforge.cce.api import IMPLS

        check_choice("loss", self.loss, LOSSES)
        check_choice("dpo_variant", self.dpo_variant, M_DPO_VARIANTS)
        check_choice("reference", self.reference, REFERENCES)
        check_choice("finetune", self.finetune, FINETUNE_OPTIONS)
        check_choice("precision", self.precision, PRECISION_OPTIONS)
        check_choice("cce_impl", self.cce_impl, IMPLS)
        if self.reference == "base" and self.finetune != "lora":
            raise ValueError("reference='base' (the adapter disabled) needs finetune='lora'; with full fine-tuning "
                             "pass reference='policy' or precomputed reference_logps")
        check_number("beta", self.beta, low=0.0, low_open=True)
        check_number("label_smoothing", self.label_smoothing, low=0.0, high=0.5, high_open=True)
        if self.label_smoothing > 0 and self.dpo_variant != "sigmoid":
            raise ValueError(f"label_smoothing applies to dpo_variant='sigmoid' only, got "
                             f"dpo_variant={self.dpo_variant!r}")
        check_number("nll_coef", self.nll_coef, low=0.0)
        check_number("desirable_weight", self.desirable_weight, low=0.0, low_open=True)
        check_number("undesirable_weight", self.undesirable_weight, low=0.0, low_open=True)
        if self.kl_max_length is not None:
            check_int("kl_max_length", self.kl_max_length, minimum=2)
        for name in ("lora_rank", "batch_size", "grad_accumulation", "save_steps", "save_total_limit",
                     "logging_steps"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("max_steps", "eval_steps", "rows_per_forward"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_number("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        check_number("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        if self.learning_rate is not None:
            check_number("learning_rate", self.learning_rate, low=0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("epochs", self.epochs, low=0.0, low_open=True)
        check_number("warmup", self.warmup, low=0.0)
        if self.warmup >= 1 and self.warmup != int(self.warmup):
            raise ValueError(f"warmup must be a fraction < 1 or a whole number of steps, got {self.warmup}")
        check_number("max_grad_norm", self.max_grad_norm, low=0.0)
        for name in ("normalize", "gradient_checkpointing", "two_pass", "compile_layers", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.two_pass and self.rows_per_forward is None:
            raise ValueError("two_pass back-propagates one chunk of rows_per_forward sequences at a time: set "
                             "rows_per_forward (1 gives the least memory)")
        if self.lora_target_modules is not None:
            if isinstance(self.lora_target_modules, str):
                self.lora_target_modules = [self.lora_target_modules]
            if (not isinstance(self.lora_target_modules, (list, tuple)) or not self.lora_target_modules
                    or not all(isinstance(n, str) and n for n in self.lora_target_modules)):
                raise TypeError(f"lora_target_modules must be a non-empty list of module names or None, "
                                f"got {self.lora_target_modules!r}")
            self.lora_target_modules = list(self.lora_target_modules)
        if not isinstance(self.output_dir, (str, os.PathLike)) or not os.fspath(self.output_dir):
            raise TypeError(f"output_dir must be a non-empty path string, got {self.output_dir!r}")
        self.output_dir = os.fspath(self.output_dir)
        if not isinstance(self.eval_metric, str) or not self.eval_metric:
            raise TypeError(f"eval_metric must be a non-empty string, got {self.eval_metric!r}")

    @property
    def is_kto(self) -> bool:
        return self.loss in ("m_kto", "kto")

    @property
    def multi_turn(self) -> bool:
        return self.loss in ("m_dpo", "m_kto")

    @property
    def resolved_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATES[self.finetune]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def use_bf16(precision: str) -> bool:
    """Whether training runs under bf16 autocast: "auto" = on CUDA devices that support bf16."""
    check_choice("precision", precision, PRECISION_OPTIONS)
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


# --------------------------------------------------------------------------------------------------
# Micro-batches


def prepare_batches(data: PreferenceData | Sequence[PreferencePair] | Sequence[KTOExample],
                    config: PrefTrainConfig, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """The run's fixed micro-batches of ``config.batch_size`` pairs (DPO losses) or trajectories (KTO).

    ``data`` is a :class:`PreferenceData` (its pairs or its KTO examples are used, by ``config.loss``) or
    a list of pairs / examples. The order is a seeded shuffle (``config.seed``). A KTO micro-batch whose
    trajectories all share one prompt borrows the completion of another prompt's trajectory for its KL
    rows (a KL estimate needs mismatched prompt/completion pairs). Tensors are on the CPU.
    """
    if not isinstance(config, PrefTrainConfig):
        raise TypeError(f"config must be a PrefTrainConfig, got {type(config).__name__}")
    wanted = KTOExample if config.is_kto else PreferencePair
    if isinstance(data, PreferenceData):
        items = list(data.kto_examples if config.is_kto else data.pairs)
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        items = list(data)
    else:
        raise TypeError(f"data must be a PreferenceData or a list of {wanted.__name__}, got {type(data).__name__}")
    if not items:
        what = "KTO examples" if config.is_kto else "preference pairs (no prompt had both a correct and an " \
                                                    "incorrect trajectory)"
        raise ValueError(f"data holds no {what}; there is nothing to train on")
    for index, item in enumerate(items):
        if not isinstance(item, wanted):
            raise TypeError(f"data[{index}] must be a {wanted.__name__} for loss={config.loss!r}, "
                            f"got {type(item).__name__}")
    order = list(range(len(items)))
    random.Random(f"lmforge-prefs-batches:{config.seed}").shuffle(order)
    items = [items[i] for i in order]
    chunks = [items[start:start + config.batch_size] for start in range(0, len(items), config.batch_size)]
    if not config.is_kto:
        return [collate_pairs(chunk, pad_token_id, multi_turn=config.multi_turn) for chunk in chunks]
    if len({example.trajectory.problem_id for example in items}) < 2:
        raise ValueError("every KTO example belongs to one prompt; KTO's KL estimate needs trajectories of at "
                         "least two prompts")
    return [_collate_kto_chunk(chunk, items, pad_token_id, config) for chunk in chunks]


def _collate_kto_chunk(chunk: list[KTOExample], items: list[KTOExample], pad_token_id: int,
                       config: PrefTrainConfig) -> dict[str, torch.Tensor]:
    prompts = {example.trajectory.problem_id for example in chunk}
    if len(prompts) > 1:
        return collate_kto(chunk, pad_token_id, multi_turn=config.multi_turn, kl_max_length=config.kl_max_length)
    # One prompt only: append another prompt's trajectory so every KL row gets its completion, then keep
    # the chunk's own rows.
    partner = next(example for example in items if example.trajectory.problem_id not in prompts)
    batch = collate_kto(chunk + [partner], pad_token_id, multi_turn=config.multi_turn,
                        kl_max_length=config.kl_max_length)
    rows = len(chunk)
    kept = {key: value[:rows] for key, value in batch.items()}
    for prefix in ("", "kl_"):  # drop columns that only the partner's rows used
        width = int(kept[f"{prefix}attention_mask"].sum(-1).max())
        for key in ("input_ids", "attention_mask", "loss_mask"):
            kept[prefix + key] = kept[prefix + key][:, :width]
    return kept


def batch_size_of(batch: Mapping[str, torch.Tensor]) -> int:
    """Pairs (DPO) or trajectories (KTO) in a micro-batch."""
    key = "chosen_input_ids" if "chosen_input_ids" in batch else "input_ids"
    return int(batch[key].shape[0])


def _fingerprint(batches: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """SHA-256 of the batches' token ids and masks: stored reference log-probs belong to these batches."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            tensor = batch[key].detach().cpu().contiguous()
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Scoring and the loss


class SequenceScorer(nn.Module):
    """The policy as a module whose forward returns summed log-probs of the masked tokens.

    Wrapping it (not the bare model) with DDP makes the whole scoring -- body, CCE head -- one DDP forward,
    so gradient synchronisation sees everything the loss used.
    """

    def __init__(self, model: nn.Module, impl: str = "auto"):
        super().__init__()
        self.model = model
        self.impl = impl

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        from lmforge.models.logprobs import token_logprobs

        return token_logprobs(self.model, input_ids, attention_mask, loss_mask, impl=self.impl).sum_logprobs


def _score(scorer: Callable, batch: Mapping[str, torch.Tensor], prefix: str, rows: int | None = None
           ) -> torch.Tensor:
    """Summed log-probs of the ``prefix`` rows, at most ``rows`` sequences per forward pass (None: all)."""
    tensors = [batch[f"{prefix}{key}"] for key in ("input_ids", "attention_mask", "loss_mask")]
    total = tensors[0].shape[0]
    if rows is None or rows >= total:
        return scorer(*tensors)
    return torch.cat([scorer(*(t[start:start + rows] for t in tensors)) for start in range(0, total, rows)])


def _pair_rows(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chosen rows, then rejected rows, as one batch (collate_pairs pads both to one length)."""
    return {key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
            for key in ("input_ids", "attention_mask", "loss_mask")}


def _score_pairs(scorer: Callable, batch: Mapping[str, torch.Tensor], rows: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs; by default in one forward pass."""
    logps = _score(scorer, _pair_rows(batch), "", rows)
    pairs = batch_size_of(batch)
    return logps[:pairs], logps[pairs:]


@torch.no_grad()
def compute_reference_logps(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], config: PrefTrainConfig,
                            *, disable_adapter: bool = False, device: torch.device | str | None = None,
                            progress: bool = False, scorer: Callable | None = None) -> list[dict[str, torch.Tensor]]:
    """Reference log-probs of every micro-batch under ``model`` (no gradients, eval mode, float32 results).

    Returns one dict per batch: ``ref_chosen_logps`` and ``ref_rejected_logps`` (DPO losses), or
    ``ref_logps`` and ``ref_kl_logps`` (KTO), each (B,) on the CPU. ``disable_adapter`` scores the
    PEFT model's base (adapter switched off). Runs under bf16 autocast when ``config.precision`` says so,
    exactly as the policy is scored in training. ``device`` defaults to the model's. ``scorer``: score
    through this module (e.g. the FSDP-wrapped :class:`SequenceScorer` of ``model``) instead of a new one.
    """
    from tqdm.auto import tqdm

    if not isinstance(config, PrefTrainConfig):
        raise TypeError(f"config must be a PrefTrainConfig, got {type(config).__name__}")
    if disable_adapter and not hasattr(model, "disable_adapter"):
        raise TypeError(f"disable_adapter=True needs a PEFT model, got {type(model).__name__}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    scorer = scorer if scorer is not None else SequenceScorer(model, config.cce_impl)
    was_training = model.training
    model.eval()
    results = []
    bf16 = use_bf16(config.precision)
    try:
        for batch in tqdm(batches, desc="reference log-probs", disable=not progress):
            batch = {key: value.to(device) for key, value in batch.items()}
            with _autocast(device, bf16), _lora_input_casts_off(model, bf16), \
                    (model.disable_adapter() if disable_adapter else contextlib.nullcontext()):
                if config.is_kto:
                    entry = {"ref_logps": _score(scorer, batch, ""), "ref_kl_logps": _score(scorer, batch, "kl_")}
                else:
                    chosen, rejected = _score_pairs(scorer, batch)
                    entry = {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
            results.append({key: value.float().cpu() for key, value in entry.items()})
    finally:
        model.train(was_training)
    return results


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def policy_logps(scorer: Callable, batch: Mapping[str, torch.Tensor], config: PrefTrainConfig
                 ) -> dict[str, torch.Tensor]:
    """The policy's summed log-probs of one micro-batch, the inputs of its loss.

    DPO losses: ``chosen`` and ``rejected`` (B,), scored together. KTO losses: ``policy`` (B,) and
    ``kl`` (B,), the mismatched KL rows, scored without gradients. ``config.rows_per_forward`` caps the
    sequences per forward pass.
    """
    rows = config.rows_per_forward
    if config.is_kto:
        logps = {"policy": _score(scorer, batch, "", rows)}
        with torch.no_grad():
            logps["kl"] = _score(scorer, batch, "kl_", rows)
        return logps
    chosen, rejected = _score_pairs(scorer, batch, rows)
    return {"chosen": chosen, "rejected": rejected}


def loss_from_logps(logps: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], config: PrefTrainConfig):
    """``config.loss`` of a micro-batch from :func:`policy_logps` and the batch's reference log-probs."""
    if config.is_kto:
        return m_kto_loss(logps["policy"], batch["ref_logps"], batch["is_desirable"], logps["kl"],
                          batch["ref_kl_logps"], beta=config.beta, desirable_weight=config.desirable_weight,
                          undesirable_weight=config.undesirable_weight)
    counts = {}
    if config.normalize or config.nll_coef > 0:
        counts = {"chosen_token_counts": batch["chosen_loss_mask"].sum(-1),
                  "rejected_token_counts": batch["rejected_loss_mask"].sum(-1)}
    return m_dpo_loss(logps["chosen"], logps["rejected"], batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                      beta=config.beta, variant=config.dpo_variant, label_smoothing=config.label_smoothing,
                      nll_coef=config.nll_coef, normalize=config.normalize, **counts)


def preference_loss(scorer: Callable, batch: Mapping[str, torch.Tensor], config: PrefTrainConfig):
    """The loss of one micro-batch holding its reference log-probs; returns the loss output.

    ``scorer(input_ids, attention_mask, loss_mask) -> (B,) summed log-probs`` is a
    :class:`SequenceScorer` (possibly DDP-wrapped). DPO losses score chosen and rejected rows in one
    forward pass (or chunks of ``config.rows_per_forward``) and return
    :class:`lmforge.prefs.losses.MDPOOutput`; KTO losses score the KL rows without gradients and return
    :class:`~lmforge.prefs.losses.MKTOOutput`.
    """
    return loss_from_logps(policy_logps(scorer, batch, config), batch, config)


def two_pass_backward(scorer: Callable, batch: Mapping[str, torch.Tensor], config: PrefTrainConfig,
                      weight: float, device: torch.device, bf16: bool):
    """Back-propagate ``weight`` x the micro-batch's loss in two passes; returns the loss output.

    Every loss here depends on the policy only through per-sequence sums s_i of log-probs, so
    dL/dtheta = sum_i (dL/ds_i) ds_i/dtheta. Pass 1 scores all sequences without gradients and takes
    g_i = dL/ds_i through the loss on detached leaves; pass 2 re-scores ``config.rows_per_forward``
    sequences at a time and back-propagates sum_i g_i s_i over each chunk, freeing its activations
    before the next. The gradients equal the one-pass ones up to float rounding.
    """
    with torch.no_grad(), _autocast(device, bf16):
        scored = policy_logps(scorer, batch, config)
    trained = ("policy",) if config.is_kto else ("chosen", "rejected")
    leaves = {key: value.detach().requires_grad_(key in trained) for key, value in scored.items()}
    output = loss_from_logps(leaves, batch, config)
    (output.loss * weight).backward()
    if config.is_kto:
        rows, weights = batch, leaves["policy"].grad
    else:
        rows, weights = _pair_rows(batch), torch.cat([leaves["chosen"].grad, leaves["rejected"].grad])
    chunk = config.rows_per_forward
    for start in range(0, weights.shape[0], chunk):
        part = {key: rows[key][start:start + chunk] for key in ("input_ids", "attention_mask", "loss_mask")}
        with _autocast(device, bf16):
            logps = _score(scorer, part, "")
        (logps * weights[start:start + chunk].to(logps.dtype)).sum().backward()
    return output


def _example_statistics(output: Any, config: PrefTrainConfig) -> dict[str, torch.Tensor]:
    """Per-example tensors of a loss output, to be gathered and averaged for the log."""
    if config.is_kto:
        return {"rewards/chosen": output.chosen_rewards, "rewards/rejected": output.rejected_rewards,
                "logps/chosen": output.chosen_logps, "logps/rejected": output.rejected_logps}
    return {"rewards/chosen": output.chosen_rewards, "rewards/rejected": output.rejected_rewards,
            "rewards/accuracies": output.reward_accuracies, "rewards/margins": output.reward_margins,
            "logps/chosen": output.chosen_logps, "logps/rejected": output.rejected_logps}


# --------------------------------------------------------------------------------------------------
# Model set-up


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def prepare_model(model: nn.Module, config: PrefTrainConfig) -> nn.Module:
    """The model to train: a PEFT model as it is (its trainable adapter), a plain model with a new LoRA
    adapter (``finetune="lora"``, seeded by ``config.seed``) or with every weight trainable (``"full"``)."""
    from lmforge.models.lora import LoraAdapterConfig, attach_lora

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers causal LM or a PEFT model, got {type(model).__name__}")
    if config.finetune == "full":
        if _is_peft(model):
            raise TypeError("finetune='full' needs a plain transformers model, got a PEFT model; pass "
                            "finetune='lora' to train its adapter")
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    if not _is_peft(model):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the adapter's initial weights are a function of the config
            model = attach_lora(model, LoraAdapterConfig(rank=config.lora_rank, alpha=config.lora_alpha,
                                                         dropout=config.lora_dropout,
                                                         target_modules=config.lora_target_modules))
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ValueError("the PEFT model has no trainable parameter; load its adapter with trainable=True "
                         "(lmforge.models.lora.load_lora(..., trainable=True))")
    return model


def _enable_checkpointing(model: nn.Module, *, inside_layers: bool = False) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (non-reentrant needs no input gradients
    with LoRA). transformers renamed gradient_checkpointing to activation_checkpointing; use what exists.

    ``inside_layers``: checkpoint each layer's ``forward`` with lmforge's own wrapper instead of transformers'
    switch (see :func:`checkpoint_decoder_layers`), so that a compiled layer also compiles its recomputation.
    """
    from lmforge.cce.patch import unwrap_causal_lm

    if inside_layers:
        checkpoint_decoder_layers(model)
        return
    causal_lm = unwrap_causal_lm(model)
    if hasattr(causal_lm, "activation_checkpointing_enable"):
        causal_lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers: modules whose class the model names in ``_no_split_modules`` (what accelerate
    and FSDP treat as blocks)."""
    from lmforge.cce.patch import unwrap_causal_lm

    block_names = set(getattr(unwrap_causal_lm(model), "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in block_names]
    if not layers:
        raise ValueError(f"{type(unwrap_causal_lm(model)).__name__} names no decoder layer class in "
                         f"_no_split_modules")
    return layers


def checkpoint_decoder_layers(model: nn.Module) -> int:
    """Checkpoint every decoder layer through its ``forward`` (non-reentrant), in place; returns how many.

    transformers (up to 5.17 at least) checkpoints around a layer's ``__call__``, outside what
    ``torch.compile`` of the layer traces: the backward's recomputation of a compiled layer then runs
    eagerly, op by op, and keeps every unfused intermediate (on a Gemma 2 2B layer with LoRA, a float32
    copy of the MLP activations among them). Wrapping ``forward`` puts the checkpoint inside the compiled
    region, where the recomputation is compiled (fused) too. transformers' own switch is turned off on
    these layers so nothing is checkpointed twice. Only training-mode forwards with gradients are
    checkpointed; the results are those of the plain layer.
    """
    layers = _decoder_layers(model)
    for layer in layers:
        if getattr(layer, "_lmforge_checkpointed", False):
            continue
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = False
        # One function shared by every layer (bound to it), not a closure per layer: torch.compile guards
        # closures by identity, so per-layer closures would compile the layer once per instance.
        layer.forward = types.MethodType(_checkpointed_forward, layer)
        layer._lmforge_checkpointed = True
    return len(layers)


def _checkpointed_forward(self, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    forward = functools.partial(type(self).forward, self)
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _lora_input_casts_off(model: nn.Module, bf16: bool):
    """Under bf16 autocast, stop PEFT from casting a LoRA layer's input to the adapter's float32 dtype:
    autocast casts it straight back to bf16 for the matmul, so the product is the same, but the float32
    copy (4 bytes per element of the layer's input, e.g. 144 MiB at the MLP of a Gemma 2 2B layer over
    4096 tokens) is gone. A no-op without autocast (then the cast is needed) or without PEFT."""
    if not bf16:
        return contextlib.nullcontext()
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:  # pragma: no cover - peft is a dependency; older versions lack the switch
        return contextlib.nullcontext()
    return disable_input_dtype_casting(model)


def compile_decoder_layers(model: nn.Module) -> int:
    """``torch.compile`` each decoder layer of a transformers (or PEFT-wrapped) model in place; returns
    how many were compiled. The layers are the modules whose class the model names in
    ``_no_split_modules`` (what accelerate and FSDP treat as blocks). Layers compiled already are left
    as they are, so a caller may compile before computing reference log-probs with the same kernels."""
    try:
        layers = _decoder_layers(model)
    except ValueError as err:
        raise ValueError(f"compile_layers: {err}") from None
    # A layer needs a graph per grad mode, per requires_grad of its input (the first layer's comes from a
    # frozen embedding), per PEFT input-cast setting and per shape class: more than dynamo's default 8, after
    # which it would silently run the layer eagerly.
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile()
    return len(layers)


def _trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


# --------------------------------------------------------------------------------------------------
# Schedule


def planned_steps(config: PrefTrainConfig, num_batches: int, world_size: int = 1) -> int:
    """Optimizer steps of the run: ``max_steps``, else ``ceil(epochs x ceil(batches / (accumulation x
    devices)))``."""
    if config.max_steps is not None:
        return config.max_steps
    per_epoch = max(1, math.ceil(num_batches / (config.grad_accumulation * max(world_size, 1))))
    return max(1, math.ceil(config.epochs * per_epoch))


def batch_order(num_batches: int, seed: int, epoch: int) -> list[int]:
    """The order micro-batches are visited in during ``epoch`` (a seeded permutation)."""
    order = list(range(num_batches))
    random.Random(f"lmforge-prefs-epoch:{seed}:{epoch}").shuffle(order)
    return order


def step_batches(step: int, num_batches: int, config: PrefTrainConfig, world_size: int = 1) -> list[list[int]]:
    """Micro-batch indices of optimizer step ``step`` (0-based), one list per process.

    The stream of micro-batches is the concatenation of the epochs' permutations; step ``s`` takes the
    next ``grad_accumulation x world_size`` of it, and process ``r`` every ``world_size``-th from ``r``.
    """
    per_step = config.grad_accumulation * world_size
    positions = range(step * per_step, (step + 1) * per_step)
    stream = [batch_order(num_batches, config.seed, position // num_batches)[position % num_batches]
              for position in positions]
    return [stream[rank::world_size] for rank in range(world_size)]


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_steps_of(config: PrefTrainConfig, total_steps: int) -> int:
    return int(config.warmup) if config.warmup >= 1 else int(math.ceil(config.warmup * total_steps))


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / CHECKPOINTS_DIRNAME
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_CHECKPOINT_PREFIX)
             and p.name[len(_CHECKPOINT_PREFIX):].isdigit() and (p / _STATE_FILENAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX):]))


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (an all-gather: every rank must call it), any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`save_model` writes, FSDP2 shards gathered, on the CPU (a collective under FSDP): a PEFT
    model's trainable (adapter) weights, or a plain model's whole state dict."""
    if _is_peft(model):
        return {name: _full_tensor(p.detach()).cpu() for name, p in _trainable_named_parameters(model)}
    return {name: _full_tensor(value).detach().cpu() for name, value in model.state_dict().items()}


def _save_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, state: dict, keep: int, *,
                     sharded_root: nn.Module | None = None, write: bool = True) -> Path:
    """Write checkpoints/step-N. With ``sharded_root`` (the FSDP2-prepared module) every rank must call it:
    trainable weights and optimizer state are gathered whole, and only ``write`` ranks write them."""
    from safetensors.torch import save_file

    from lmforge.models.loading import write_directory_atomically

    tensors = {name: _full_tensor(p.detach()).cpu().contiguous() for name, p in _trainable_named_parameters(model)}
    if sharded_root is None:
        optimizer_state = optimizer.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer_state = get_optimizer_state_dict(sharded_root, getattr(optimizer, "optimizer", optimizer),
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    target = run_dir / CHECKPOINTS_DIRNAME / f"{_CHECKPOINT_PREFIX}{state['step']:06d}"
    if not write:
        return target
    with write_directory_atomically(target, overwrite=True) as staging:
        save_file(tensors, str(staging / _TRAINABLE_FILENAME))
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng},
                   staging / _OPTIMIZER_FILENAME)
        (staging / _STATE_FILENAME).write_text(json.dumps(state))
    for old in _checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _load_checkpoint(checkpoint: Path, model: nn.Module, optimizer, scheduler, *,
                     sharded_root: nn.Module | None = None) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(checkpoint / _TRAINABLE_FILENAME))
    parameters = dict(_trainable_named_parameters(model))
    if set(tensors) != set(parameters):
        missing, extra = sorted(set(parameters) - set(tensors)), sorted(set(tensors) - set(parameters))
        raise ValueError(f"checkpoint {checkpoint} does not fit this model's trainable parameters (missing "
                         f"{missing[:3]}, unexpected {extra[:3]}); was it made with another model or finetune?")
    with torch.no_grad():
        for name, parameter in parameters.items():
            value = tensors[name]
            if hasattr(parameter, "device_mesh"):  # an FSDP2 shard: this rank's part of the whole value
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(parameter.device, parameter.dtype), parameter.device_mesh,
                                          parameter.placements)
            parameter.copy_(value.to(parameter.device, parameter.dtype))
    bundle = torch.load(checkpoint / _OPTIMIZER_FILENAME, map_location="cpu", weights_only=False)
    if sharded_root is None:
        optimizer.load_state_dict(bundle["optimizer"])
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(sharded_root, getattr(optimizer, "optimizer", optimizer), bundle["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(bundle["scheduler"])
    random.setstate(bundle["rng"]["python"])
    torch.set_rng_state(bundle["rng"]["torch"])
    if bundle["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(bundle["rng"]["cuda"])
    return json.loads((checkpoint / _STATE_FILENAME).read_text())


def _check_resumable(config: PrefTrainConfig, run_dir: Path, checkpoint: Path | None) -> None:
    check_resumable(run_dir, checkpoint, resume=config.resume, current=config.to_dict(),
                    identity_fields=_RUN_IDENTITY_FIELDS, config_file=CONFIG_FILENAME, what="training settings")


def save_model(model: nn.Module, tokenizer: Any, folder: Path, *, state_dict: dict | None = None) -> Path:
    """Save the policy atomically: a PEFT adapter folder for a PEFT model, a model folder otherwise, with
    the tokenizer. ``state_dict``: the weights to write (e.g. gathered from FSDP shards) instead of the
    model's own."""
    from lmforge.models.loading import write_directory_atomically

    with write_directory_atomically(folder, overwrite=True) as staging:
        extra = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(staging, safe_serialization=True, **extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return folder


# --------------------------------------------------------------------------------------------------
# Evaluation callback


def make_agent_eval(problems: Sequence[Any], tokenizer: Any, rollout_config: Any = None,
                    output_path: str | os.PathLike | None = None) -> Callable[[nn.Module], dict[str, float]]:
    """An ``eval_fn`` for :func:`train_preferences`: greedy tool-using rollouts of ``problems`` with the
    model being trained; returns :func:`lmforge.agent.evaluate.summarise` metrics (``accuracy``, tool use,
    ...). ``rollout_config`` (a RolloutConfig) sets limits; temperature is forced to 0 and one sample per
    problem. Each call writes its trajectories to ``output_path`` (overwritten) when given."""
    from lmforge.agent.evaluate import summarise
    from lmforge.agent.rollout import RolloutConfig, TransformersBackend, run_rollouts

    problems = list(problems)
    if not problems:
        raise ValueError("problems is empty; an agent eval needs at least one problem")
    base = rollout_config if rollout_config is not None else RolloutConfig()
    if not isinstance(base, RolloutConfig):
        raise TypeError(f"rollout_config must be a RolloutConfig, got {type(base).__name__}")
    config = dataclasses.replace(base, samples_per_problem=1, temperature=0.0, output_path=None, progress=False)

    def evaluate(model: nn.Module) -> dict[str, float]:
        trajectories = run_rollouts(problems, TransformersBackend(model, tokenizer), tokenizer, config)
        if output_path is not None:
            from lmforge.agent.format import write_trajectories

            write_trajectories(output_path, trajectories)
        return summarise(trajectories, levels={p.id: p.level for p in problems})

    return evaluate


# --------------------------------------------------------------------------------------------------
# Training


def train_preferences(model: nn.Module, tokenizer: Any, data: PreferenceData | Sequence[Any],
                      config: PrefTrainConfig, *, reference_logps: Sequence[Mapping[str, torch.Tensor]] | None = None,
                      eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None) -> dict[str, Any]:
    """Train ``model`` on preference ``data`` with ``config.loss``; return a summary of the run.

    Args:
        model: a transformers causal LM (LoRA is attached, or every weight trained, per ``config.finetune``)
            or a PEFT model whose adapter is trainable. It is trained in place.
        tokenizer: its tokenizer (padding id; saved with the model).
        data: :class:`PreferenceData` (or a list of pairs / KTO examples).
        config: :class:`PrefTrainConfig`.
        reference_logps: per-micro-batch reference log-probs from :func:`compute_reference_logps` on
            :func:`prepare_batches` of the same data and config, computed with any model (e.g. the
            initial policy, loaded and freed). None: computed here from ``config.reference``.
        eval_fn: ``eval_fn(model) -> metrics`` (e.g. :func:`make_agent_eval`), run on the main process
            every ``eval_steps`` and at the end; ``config.eval_metric`` of its result picks ``best/``.

    Returns:
        A dict: ``model`` (the trained module, a PEFT model for LoRA), ``global_step``, ``loss``,
        ``reward_accuracy``, ``reward_margin`` (means over the last logged steps; None for KTO's
        accuracy), ``eval`` (the last eval metrics), ``best_eval`` / ``best_step``, counts, timings and
        the paths ``run_dir``, ``final_dir``, ``best_dir`` (None without eval), ``metrics_path``,
        ``report_path``, ``plot_path``, ``reference_path``.
    """
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm

    if not isinstance(config, PrefTrainConfig):
        raise TypeError(f"config must be a PrefTrainConfig, got {type(config).__name__}")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn must be callable or None, got {type(eval_fn).__name__}")
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "eos_token_id", None)
    if pad_token_id is None:
        raise ValueError("tokenizer has no pad or eos token id to pad batches with")
    started = time.perf_counter()
    run_dir = Path(config.output_dir).expanduser().resolve()
    existing = _checkpoints(run_dir)
    checkpoint = existing[-1] if existing else None
    _check_resumable(config, run_dir, checkpoint)

    bf16 = use_bf16(config.precision)
    accelerator = _accelerator(bf16)
    world_size, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device

    batches = prepare_batches(data, config, pad_token_id)
    model = prepare_model(model, config)  # with reference="base" (LoRA only), a PEFT model from here on
    set_seed(config.seed)  # dropout, if any; the data order is seeded on its own
    if config.gradient_checkpointing:
        _enable_checkpointing(model, inside_layers=config.compile_layers)
    model.to(device)
    if config.compile_layers:
        compile_decoder_layers(model)

    total_steps = planned_steps(config, len(batches), world_size)
    warmup_steps = warmup_steps_of(config, total_steps)
    trainable = [p for _, p in _trainable_named_parameters(model)]
    optimizer = torch.optim.AdamW(trainable, lr=config.resolved_learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, warmup_steps))
    # Several forward passes per backward (rows_per_forward) or several backward passes per micro-batch
    # (two_pass) do not fit DDP's one-forward-one-backward hooks: such steps run under no_sync and the
    # gradients are averaged once at the end of the step.
    manual_sync = world_size > 1 and config.rows_per_forward is not None
    if manual_sync and accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise ValueError(f"rows_per_forward and two_pass run on one process or under DDP, not "
                         f"{accelerator.distributed_type.value}")
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp:
        if eval_fn is not None:
            raise ValueError("eval_fn under FSDP: generation needs every rank's shards, but evaluation runs on the "
                             "main process; evaluate the saved adapter after training instead")
        _keep_fsdp_outputs_in_float32(accelerator)
        # FSDP2 replaces the parameters by sharded ones; accelerate re-points the optimizer at them.
        scorer, optimizer = accelerator.prepare(SequenceScorer(model, config.cce_impl), optimizer)
        trainable = [p for _, p in _trainable_named_parameters(model)]
    else:
        scorer = accelerator.prepare(SequenceScorer(model, config.cce_impl))
    # Under FSDP the reference is scored through the sharded policy, with the numerics it trains with
    # (its mixed-precision policy): step-0 rewards are then exactly 0 there too.
    reference_logps = _reference_for_run(model, batches, config, reference_logps, run_dir, accelerator,
                                         sharded_scorer=scorer if fsdp else None)
    batches = [{**batch, **reference} for batch, reference in zip(batches, reference_logps)]
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / CONFIG_FILENAME, yaml.safe_dump(config.to_dict(), sort_keys=False))

    state = {"step": 0, "log_history": [], "best": None, "last_eval": None, "evaluated_step": None}
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler, sharded_root=scorer if fsdp else None)
        logger.info("resuming from %s (step %d of %d)", checkpoint, state["step"], total_steps)
    metrics_path = run_dir / METRICS_FILENAME
    if is_main:
        write_text_atomic(metrics_path, "".join(json.dumps(entry) + "\n" for entry in state["log_history"]))
    best_dir = run_dir / BEST_DIRNAME

    def evaluate(step: int) -> None:
        state["evaluated_step"] = step  # on every process, so all agree whether the final eval is done
        if is_main:
            model.eval()
            with torch.no_grad(), _autocast(device, bf16):
                metrics = {key: float(value) for key, value in eval_fn(model).items()
                           if isinstance(value, (int, float)) and not isinstance(value, bool)}
            model.train()
            if config.eval_metric not in metrics:
                raise ValueError(f"eval_fn returned no {config.eval_metric!r} (eval_metric); it returned "
                                 f"{sorted(metrics)}")
            entry = {"step": step, **{f"eval/{key}": value for key, value in metrics.items()}}
            _append_log(metrics_path, entry, state)
            state["last_eval"] = metrics
            if state["best"] is None or metrics[config.eval_metric] > state["best"]["value"]:
                state["best"] = {"step": step, "value": metrics[config.eval_metric], "metrics": metrics}
                save_model(model, tokenizer, best_dir)
        accelerator.wait_for_everyone()

    model.train()
    window: list[dict[str, float]] = []
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"{config.loss} training", unit="step",
               disable=not (config.progress and is_main))
    try:
        while state["step"] < total_steps:
            step = state["step"]
            step_started = _step_clock(device, start=True)
            mine = step_batches(step, len(batches), config, world_size)
            step_items = sum(batch_size_of(batches[i]) for per_rank in mine for i in per_rank)
            statistics: dict[str, list[torch.Tensor]] = {}
            weighted_loss = torch.zeros((), device=device)
            for position, index in enumerate(mine[rank]):
                batch = {key: value.to(device) for key, value in batches[index].items()}
                # DDP averages gradients over processes, so each process's share is scaled by world_size.
                weight = batch_size_of(batch) * world_size / step_items
                last = position == len(mine[rank]) - 1
                with (contextlib.nullcontext() if last and not manual_sync else accelerator.no_sync(scorer)), \
                        _lora_input_casts_off(model, bf16):
                    if config.two_pass:
                        output = two_pass_backward(scorer, batch, config, weight, device, bf16)
                    else:
                        with _autocast(device, bf16):
                            output = preference_loss(scorer, batch, config)
                        accelerator.backward(output.loss * weight)
                weighted_loss += output.loss.detach().float() * weight / world_size
                for key, value in _example_statistics(output, config).items():
                    statistics.setdefault(key, []).append(value.float())
            if manual_sync:
                _average_gradients(trainable, world_size)
            grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm) \
                if config.max_grad_norm > 0 else None
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step + 1

            metrics = _step_metrics(accelerator, weighted_loss, statistics, grad_norm, learning_rate)
            metrics.update(_step_clock(device, start=False, started=step_started))
            window.append(metrics)
            if state["step"] % config.logging_steps == 0 or state["step"] == total_steps:
                entry = {key: sum(w[key] for w in window if key in w) / max(1, sum(key in w for w in window))
                         for key in window[-1]}
                entry.update(step=state["step"], epoch=state["step"] * config.grad_accumulation * world_size
                             / len(batches))
                if is_main:
                    _append_log(metrics_path, entry, state)
                bar.set_postfix({k: f"{entry[k]:.3f}" for k in ("loss", "rewards/accuracies") if k in entry},
                                refresh=False)
                window = []
            if eval_fn is not None and ((config.eval_steps and state["step"] % config.eval_steps == 0)
                                        or state["step"] == total_steps):
                evaluate(state["step"])
            if state["step"] % config.save_steps == 0 or state["step"] == total_steps:
                if is_main or fsdp:  # under FSDP every rank takes part in gathering the shards
                    _save_checkpoint(run_dir, model, optimizer, scheduler, state, config.save_total_limit,
                                     sharded_root=scorer if fsdp else None, write=is_main)
                accelerator.wait_for_everyone()
            bar.update(1)
    finally:
        bar.close()

    if eval_fn is not None and state.get("evaluated_step") != state["step"]:
        evaluate(state["step"])  # e.g. a finished run resumed with an eval_fn it did not have before
    final_dir = run_dir / FINAL_DIRNAME
    if fsdp:
        full_state = _full_state_dict(model)  # collective; the full tensors land on the main process
        if is_main:
            save_model(model, tokenizer, final_dir, state_dict=full_state)
    elif is_main:
        save_model(model, tokenizer, final_dir)
    accelerator.wait_for_everyone()
    history = state["log_history"]
    train_entries = [entry for entry in history if "loss" in entry]
    last = train_entries[-1] if train_entries else {}
    result = {
        "model": model,
        "global_step": state["step"],
        "total_steps": total_steps,
        "loss": last.get("loss"),
        "reward_accuracy": last.get("rewards/accuracies"),
        "reward_margin": last.get("rewards/margins"),
        "eval": state["last_eval"],
        "best_eval": state["best"]["metrics"] if state["best"] else None,
        "best_step": state["best"]["step"] if state["best"] else None,
        "num_examples": sum(batch_size_of(batch) for batch in batches),
        "num_batches": len(batches),
        "resumed_from": str(checkpoint) if checkpoint is not None else None,
        "bf16": bf16,
        "world_size": world_size,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "wall_seconds": time.perf_counter() - started,
        "run_dir": str(run_dir),
        "final_dir": str(final_dir),
        "best_dir": str(best_dir) if state["best"] else None,
        "metrics_path": str(metrics_path),
        "report_path": str(run_dir / REPORT_FILENAME),
        "plot_path": str(run_dir / PLOT_FILENAME),
        "reference_path": str(run_dir / REFERENCE_FILENAME),
    }
    if is_main:
        plot_curves(history, run_dir / PLOT_FILENAME, title=f"{config.loss} training")
        write_text_atomic(run_dir / REPORT_FILENAME, _report(config, result, data))
    return result


def _keep_fsdp_outputs_in_float32(accelerator) -> None:
    """accelerate's FSDP2 mixed precision casts every unit's outputs to bf16, the root's too: the policy's
    per-sequence log-prob sums (~1e3 nats) would be rounded to steps of 4, below which rewards vanish.
    Outputs keep their dtype instead (the layers still compute in bf16) and gradients are reduced in
    float32, as DDP does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 2:
        return
    policy = plugin.mixed_precision_policy
    param_dtype = getattr(policy, "param_dtype", None) if policy is not None else None
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                                         output_dtype=None)


def _average_gradients(parameters: Sequence[nn.Parameter], world_size: int) -> None:
    """All-reduce the mean of every gradient over the processes (what DDP does in its backward hooks)."""
    import torch.distributed as dist

    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad.div_(world_size)


def _accelerator(bf16: bool):
    """An Accelerator whose mixed precision is ``bf16`` (or none).

    accelerate keeps one precision per process. A single-process caller that trained with another precision
    before (e.g. transformers' Trainer with bf16, then this with fp32) gets the precision reset; under a
    distributed launch a mismatch is an error, since every process must agree.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    wanted = "bf16" if bf16 else "no"
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != wanted:
        if PartialState().use_distributed:
            raise ValueError(f"this process already runs accelerate with mixed_precision="
                             f"{AcceleratorState().mixed_precision!r}; precision must match it under a distributed "
                             f"launch (set precision, or the launcher's --mixed_precision)")
        AcceleratorState._reset_state()  # the process (device, ranks) stays; only the precision changes
    return Accelerator(mixed_precision=wanted, cpu=not torch.cuda.is_available())


def _reference_for_run(model, batches, config, given, run_dir: Path, accelerator, *,
                       sharded_scorer: nn.Module | None = None) -> list[dict[str, torch.Tensor]]:
    """Reference log-probs of the run's batches: read back from the run folder (a resumed run), taken
    from the caller, or computed now (each process scores a share; the shares are exchanged). With
    ``sharded_scorer`` (FSDP) every process scores every batch through it, in step with the others."""
    from accelerate.utils import gather_object

    path = run_dir / REFERENCE_FILENAME
    fingerprint = _fingerprint(batches)
    expected = {"ref_logps", "ref_kl_logps"} if config.is_kto else {"ref_chosen_logps", "ref_rejected_logps"}
    if given is not None:
        given = list(given)
        if len(given) != len(batches):
            raise ValueError(f"reference_logps has {len(given)} entries but the data make {len(batches)} "
                             f"micro-batches; compute them with prepare_batches(data, config, pad_token_id)")
        for index, (entry, batch) in enumerate(zip(given, batches)):
            if not isinstance(entry, Mapping) or set(entry) != expected:
                raise ValueError(f"reference_logps[{index}] must be a dict with keys {sorted(expected)}, "
                                 f"got {sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__}")
            for key, value in entry.items():
                if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch_size_of(batch),):
                    raise ValueError(f"reference_logps[{index}][{key!r}] must be a tensor of shape "
                                     f"({batch_size_of(batch)},)")
        reference, source = [{k: v.detach().float().cpu() for k, v in e.items()} for e in given], "given"
    elif path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=False)
        if stored.get("fingerprint") != fingerprint:
            raise ValueError(f"{path} holds reference log-probs of other data (its fingerprint differs); the run "
                             f"folder belongs to another run: choose a new output_dir")
        return stored["values"]
    elif sharded_scorer is not None:
        reference = compute_reference_logps(model, batches, config, disable_adapter=config.reference == "base",
                                            device=accelerator.device, scorer=sharded_scorer,
                                            progress=config.progress and accelerator.is_main_process)
        source = config.reference
    else:
        share = list(range(accelerator.process_index, len(batches), accelerator.num_processes))
        values = compute_reference_logps(model, [batches[i] for i in share], config,
                                         disable_adapter=config.reference == "base", device=accelerator.device,
                                         progress=config.progress and accelerator.is_main_process)
        gathered = gather_object(list(zip(share, values))) if accelerator.num_processes > 1 \
            else list(zip(share, values))
        reference = [value for _, value in sorted(gathered, key=lambda item: item[0])]
        source = config.reference
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save({"fingerprint": fingerprint, "source": source, "values": reference}, temporary)
        os.replace(temporary, path)
    accelerator.wait_for_everyone()
    return reference


def _step_clock(device: torch.device, *, start: bool, started: tuple[float, int] = (0.0, 0)):
    """Step timing, and on CUDA the memory allocated when the step starts and the allocator's peak during it.

    Call with ``start=True`` before the step (returns the start), then with ``start=False`` and that start
    after it (returns the metrics).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if start:
            torch.cuda.reset_peak_memory_stats(device)
    if start:
        return time.perf_counter(), torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    metrics = {"step_seconds": time.perf_counter() - started[0]}
    if device.type == "cuda":
        metrics["step_start_memory_gib"] = started[1] / 2**30
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return metrics


def _step_metrics(accelerator, weighted_loss: torch.Tensor, statistics: Mapping[str, list[torch.Tensor]],
                  grad_norm, learning_rate: float) -> dict[str, float]:
    """Means over every example of the step on every process (gathered), the loss, lr and grad norm."""
    loss = accelerator.reduce(weighted_loss, reduction="sum") if accelerator.num_processes > 1 else weighted_loss
    metrics = {"loss": float(loss), "learning_rate": float(learning_rate)}
    if grad_norm is not None:
        metrics["grad_norm"] = float(_full_tensor(grad_norm))
    for key, values in statistics.items():
        local = torch.cat(values)
        if accelerator.num_processes > 1:
            # Class sizes differ between processes for KTO, so sums and counts are reduced, not tensors.
            total = accelerator.reduce(torch.stack([local.sum(), torch.tensor(float(local.numel()),
                                                                              device=local.device)]), "sum")
            if float(total[1]) > 0:
                metrics[key] = float(total[0] / total[1])
        elif local.numel():
            metrics[key] = float(local.mean())
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics and "rewards/margins" not in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def _append_log(path: Path, entry: Mapping[str, Any], state: dict) -> None:
    state["log_history"].append(dict(entry))
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")


# --------------------------------------------------------------------------------------------------
# Plot and report


def plot_curves(history: Sequence[Mapping[str, Any]], path: Path, *, title: str = "preference training") -> None:
    """Loss, reward accuracy (and eval accuracy), reward margin, and chosen/rejected log-probs against the
    optimizer step, as one PNG (matplotlib Agg), written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> list[tuple[int, float]]:
        return [(entry["step"], entry[key]) for entry in history if key in entry]

    figure = Figure(figsize=(10, 6.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    panels = [
        (axes[0, 0], [("loss", "train loss", "tab:blue")], "loss"),
        (axes[0, 1], [("rewards/accuracies", "reward accuracy", "tab:green"),
                      ("eval/accuracy", "eval accuracy", "tab:red")], "share"),
        (axes[1, 0], [("rewards/margins", "reward margin", "tab:purple"), ("rewards/chosen", "chosen reward",
                                                                            "tab:green"),
                      ("rewards/rejected", "rejected reward", "tab:red")], "beta x log-ratio"),
        (axes[1, 1], [("logps/chosen", "chosen log-prob", "tab:green"),
                      ("logps/rejected", "rejected log-prob", "tab:red")], "summed log-prob (nats)"),
    ]
    for ax, lines, ylabel in panels:
        drawn = False
        for key, label, color in lines:
            points = series(key)
            if points:
                ax.plot(*zip(*points), "o-" if key.startswith("eval/") or len(points) < 3 else "-", label=label,
                        color=color, markersize=3)
                drawn = True
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png")
    os.replace(temporary, path)


def _report(config: PrefTrainConfig, result: Mapping[str, Any], data: Any) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))

    stats = getattr(data, "stats", None)
    unit = "trajectories" if config.is_kto else "pairs"
    lines = [
        f"# Preference training ({config.loss})",
        "",
        f"- loss: {config.loss} ({'policy tokens only' if config.multi_turn else 'every token after the prompt'}),"
        f" beta {config.beta:g}" + ("" if config.is_kto else f", variant {config.dpo_variant}")
        + (f", NLL coefficient {config.nll_coef:g}" if config.nll_coef else ""),
        f"- data: {result['num_examples']} {unit} in {result['num_batches']} micro-batches of up to "
        f"{config.batch_size}" + (f" (from {stats.get('prompts')} prompts, {stats.get('prompts_with_pair')} with "
                                  f"a pair)" if isinstance(stats, Mapping) else ""),
        f"- reference: {config.reference}, log-probs computed once before training ({REFERENCE_FILENAME})",
        f"- fine-tuning: {config.finetune}" + (f" (rank {config.lora_rank}, alpha {config.lora_alpha:g})"
                                               if config.finetune == "lora" else ""),
        f"- trainable parameters: {result['trainable_parameters']:,} of {result['total_parameters']:,}",
        f"- precision: {'bf16 autocast' if result['bf16'] else 'float32'}; log-probs through lmforge.cce "
        f"(no logits)",
        f"- optimisation: AdamW, lr {config.resolved_learning_rate:g}, warm-up {config.warmup:g} then cosine, "
        f"{config.batch_size} x {config.grad_accumulation} accumulation x {result['world_size']} process(es)",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        f"| optimizer steps | {result['global_step']} |",
        f"| last loss | {fmt(result['loss'])} |",
        f"| last reward accuracy | {fmt(result['reward_accuracy'])} |",
        f"| last reward margin | {fmt(result['reward_margin'])} |",
    ]
    if result["eval"]:
        lines.append(f"| final eval {config.eval_metric} | {fmt(result['eval'].get(config.eval_metric))} |")
    if result["best_eval"]:
        lines.append(f"| best eval {config.eval_metric} (step {result['best_step']}) | "
                     f"{fmt(result['best_eval'].get(config.eval_metric))} |")
    lines += [
        f"| resumed from | {result['resumed_from'] or '-'} |",
        f"| wall time (this call) | {result['wall_seconds']:.1f} s |",
        "",
        f"Curves: ![curves]({PLOT_FILENAME}); every log line: {METRICS_FILENAME}; the trained model: "
        f"{FINAL_DIRNAME}/" + (f"; the best evaluated one: {BEST_DIRNAME}/" if result["best_eval"] else "") + ".",
        "",
    ]
    return "\n".join(lines)
