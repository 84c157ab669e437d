"""Chat format and token-exact trajectories of the tool-integrated math agent.

A trajectory is a conversation (user question, assistant turns that end in a ```python block, tool
turns holding an ```output block, a final assistant turn with ``\\boxed{}``) together with the token
ids the policy saw and sampled, and a per-token ``policy_mask``:

* 1 for every token the policy sampled, as it sampled it (including the end-of-turn token when the
  policy sampled one);
* 0 for the prompt, for template scaffolding the policy did not generate (role headers, the
  end-of-turn token after a turn that was stopped at the end of a code block, the generation prompt)
  and for tool output.

Training uses these ids and this mask; nothing is re-tokenised from text, so a trainer scores
exactly the tokens that were sampled (decode -> encode is not the identity for BPE tokenizers).

How the ids are built (:class:`ChatFormat`), incrementally, from the model's own chat template:

1. prompt: ``apply_chat_template(messages, add_generation_prompt=True)``, mask 0;
2. each assistant turn: the sampled ids, mask 1;
3. after an assistant turn that asked for a tool call: the text the template puts after the
   assistant's content (the rest of its turn, the tool turn with the tool output, the next
   generation prompt), tokenised, mask 0; if the policy already sampled the template's end-of-turn
   token, that token is not added a second time;
4. after the last assistant turn: the rest of the template's end of turn (``"\\n"`` in ChatML, the
   end-of-sequence token some templates add), mask 0, so that for prefix-stable templates the ids
   are exactly what the template gives for the whole conversation.

The text of step 3 and 4 is found by rendering a *minimal* conversation -- the leading system and
user messages, one assistant message whose content is a placeholder word, and the tool message --
and taking everything the template renders after the placeholder. Only the segment being appended
is rendered, never a re-rendering of the whole history, so templates whose rendering of earlier
turns changes as the conversation grows (Qwen3 drops the ``<think>`` part of assistant turns that
are no longer last; Mistral moves the system prompt to the last user turn) still give the right
scaffolding for the segment: exactly what the template renders after an assistant turn followed
by a tool turn. This assumes, as real templates do, that a turn's scaffolding depends on its role,
its content and its neighbours, not on how many turns came before.

The template's end-of-turn token is likewise read from the template (the first token it renders
after an assistant message's content, when that is a special / added token), never hard-coded, and
is a stop token for generation together with the tokenizer's eos token.

Many templates have no ``tool`` role (Gemma, Phi-3 and Mistral drop or reject it), so the role the
template sees for tool output is configurable (``tool_role="user"``). Messages are stored with the
role ``"tool"`` whatever the template saw; :meth:`ChatFormat.template_messages` maps them back.

Trajectories are serialised as JSON lines (:func:`trajectory_to_json`, :func:`read_trajectories`,
:func:`append_trajectory`); a torn last line (a crash in the middle of a write) is skipped on read.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

from lmforge.files import write_text_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "ChatFormat",
    "TOOL_ROLES",
    "Trajectory",
    "append_trajectory",
    "policy_spans",
    "read_trajectories",
    "trajectory_from_json",
    "trajectory_to_json",
    "write_trajectories",
]

TOOL_ROLES: tuple[str, ...] = ("tool", "user")
"""Roles the chat template may be shown for tool output."""

MESSAGE_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

# Plain words no template trims, splits or escapes; rendered in place of real content to find the
# scaffolding a template puts around it.
_ASSISTANT_PLACEHOLDER = "LMFORGEASSISTANTPLACEHOLDER"
_TOOL_PLACEHOLDER = "LMFORGETOOLPLACEHOLDER"
_QUESTION_PLACEHOLDER = "LMFORGEQUESTIONPLACEHOLDER"


# --------------------------------------------------------------------------------------------
# The trajectory record
# --------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """One conversation with its token ids and policy mask.

    ``input_ids[t]`` was sampled by the policy iff ``policy_mask[t] == 1``. ``messages`` hold the
    conversation as text (tool turns with role ``"tool"``). ``problem_id`` / ``sample_index``
    identify it within a rollout; ``gold``, ``correct`` and ``predicted`` are the grade of the final
    answer; ``tool_calls`` has one dict per executed code block (code, output, ok, error_kind,
    error, elapsed_s, truncated); ``errors`` lists what went wrong in words (failed tool calls, a
    grading timeout); ``finish_reason`` says why the trajectory ended.
    """

    input_ids: list[int] = field(default_factory=list)
    policy_mask: list[int] = field(default_factory=list)
    messages: list[dict[str, str]] = field(default_factory=list)
    problem_id: str | None = None
    sample_index: int = 0
    gold: str | None = None
    correct: bool | None = None
    predicted: str | None = None
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def append_tokens(self, ids: Sequence[int], *, sampled: bool) -> None:
        """Append ``ids`` with mask 1 (``sampled=True``: the policy generated them) or 0."""
        ids = [int(i) for i in ids]
        self.input_ids.extend(ids)
        self.policy_mask.extend([1 if sampled else 0] * len(ids))

    @property
    def num_policy_tokens(self) -> int:
        """How many tokens the policy sampled."""
        return sum(self.policy_mask)

    @property
    def final_answer_text(self) -> str | None:
        """Content of the last assistant message (what is graded), or None if there is none."""
        for message in reversed(self.messages):
            if message["role"] == "assistant":
                return message["content"]
        return None

    def key(self) -> tuple[str | None, int]:
        """``(problem_id, sample_index)``, the identity of a trajectory within a rollout."""
        return self.problem_id, self.sample_index


def policy_spans(policy_mask: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` index ranges of the runs of 1s in ``policy_mask`` (one per assistant turn)."""
    spans: list[tuple[int, int]] = []
    start = None
    for index, value in enumerate(policy_mask):
        if value and start is None:
            start = index
        elif not value and start is not None:
            spans.append((start, index))
            start = None
    if start is not None:
        spans.append((start, len(policy_mask)))
    return spans


# --------------------------------------------------------------------------------------------
# The chat format
# --------------------------------------------------------------------------------------------


def _check_messages(messages: Any, name: str = "messages") -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"{name} must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.100}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"{name}[{index}] must be a dict with a str 'content', got {message!r:.100}")
        if message.get("role") not in MESSAGE_ROLES:
            raise ValueError(f"{name}[{index}]['role'] must be one of {MESSAGE_ROLES}, got {message.get('role')!r}")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


class ChatFormat:
    """Token-exact trajectory building with one tokenizer's chat template (see the module docstring).

    ``tool_role``: the role the template is shown for tool output, ``"tool"`` or ``"user"``.
    ``chat_template_kwargs``: extra variables for the template (e.g. ``{"enable_thinking": False}``).

    Construction probes the template once and raises ValueError when it cannot be used: no chat
    template, assistant content not rendered verbatim, or tool output dropped or rejected (then the
    message suggests ``tool_role="user"``).
    """

    def __init__(self, tokenizer: Any, *, tool_role: str = "tool", chat_template_kwargs: dict | None = None):
        if not hasattr(tokenizer, "apply_chat_template") or not callable(tokenizer):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("tokenizer has no chat_template; set tokenizer.chat_template to a Jinja template")
        if tool_role not in TOOL_ROLES:
            raise ValueError(f"tool_role must be one of {TOOL_ROLES}, got {tool_role!r}")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise TypeError(f"chat_template_kwargs must be a dict or None, got {type(chat_template_kwargs).__name__}")
        self.tokenizer = tokenizer
        self.tool_role = tool_role
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

        probe_head = [{"role": "user", "content": _QUESTION_PLACEHOLDER}]
        turn_end = self._text_after_assistant(probe_head, None)
        tool_segment = self._text_after_assistant(probe_head, _TOOL_PLACEHOLDER)
        if _TOOL_PLACEHOLDER not in tool_segment:
            raise ValueError(
                f"the chat template does not render messages with role {tool_role!r} (tool output would be lost)"
                + ("; use tool_role='user'" if tool_role == "tool" else "")
            )
        self.end_of_turn_text = turn_end
        """What the template renders right after an assistant message's content (may be '')."""
        self.end_of_turn_id = self._end_of_turn_id(turn_end)
        """The template's end-of-turn token (the first token of ``end_of_turn_text`` when it is a
        special / added token), or None when the template ends turns with plain text."""
        stops = [self.end_of_turn_id, getattr(tokenizer, "eos_token_id", None)]
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in stops if i is not None))
        """Tokens that end an assistant turn: the template's end-of-turn token and the eos token."""

    # ---------------------------------------------------------------- rendering

    def template_messages(self, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """``messages`` with role ``"tool"`` replaced by ``tool_role``: what the template is shown."""
        return [
            {"role": self.tool_role if m["role"] == "tool" else m["role"], "content": m["content"]}
            for m in messages
        ]

    def render(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> str:
        """The template's text for ``messages`` (tool role mapped); errors name the template."""
        try:
            text = self.tokenizer.apply_chat_template(
                self.template_messages(messages),
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **self.chat_template_kwargs,
            )
        except Exception as error:  # jinja errors, raise_exception() of the template
            roles = [m["role"] for m in self.template_messages(messages)]
            hint = "; if it rejects the tool role, use tool_role='user'" if self.tool_role == "tool" else ""
            raise ValueError(f"the chat template failed to render roles {roles}: {error}{hint}") from error
        if not isinstance(text, str):
            raise ValueError(f"the chat template rendered {type(text).__name__}, expected str")
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without added special tokens (the template writes its own)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _text_after_assistant(self, head: Sequence[dict[str, str]], tool_content: str | None) -> str:
        """What the template renders after an assistant message's content: with ``tool_content``
        the rest of the turn, the tool turn and the next generation prompt; without it, the rest of
        the turn when the conversation ends there."""
        conversation = [*head, {"role": "assistant", "content": _ASSISTANT_PLACEHOLDER}]
        if tool_content is not None:
            conversation.append({"role": "tool", "content": tool_content})
        text = self.render(conversation, add_generation_prompt=tool_content is not None)
        position = text.rfind(_ASSISTANT_PLACEHOLDER)
        if position < 0:
            raise ValueError(
                "the chat template does not render assistant content verbatim, so the tokens around it "
                "cannot be found; token-exact trajectories need a template that does"
            )
        return text[position + len(_ASSISTANT_PLACEHOLDER) :]

    def _end_of_turn_id(self, turn_end: str) -> int | None:
        ids = self.encode(turn_end) if turn_end else []
        if not ids:
            return None
        special_ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        special_ids.update(i for i, token in added.items() if getattr(token, "special", False))
        return ids[0] if ids[0] in special_ids else None

    @staticmethod
    def _head(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
        """The leading system message(s) and the first user message: context for minimal renders."""
        head = []
        for message in messages:
            head.append(message)
            if message["role"] == "user":
                return head
        raise ValueError("messages must contain a user message before the first assistant turn")

    # ---------------------------------------------------------------- the pieces

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids of ``messages`` with the generation prompt, as ``apply_chat_template`` tokenises them."""
        messages = _check_messages(messages)
        return self.encode(self.render(messages, add_generation_prompt=True))

    def ends_with_end_of_turn(self, sampled_ids: Sequence[int]) -> bool:
        """Whether the sampled turn ends with one of :attr:`stop_token_ids`."""
        return bool(sampled_ids) and int(sampled_ids[-1]) in self.stop_token_ids

    def assistant_content(self, sampled_ids: Sequence[int]) -> str:
        """The text of a sampled turn for ``messages``: its decoded ids without the final stop token."""
        ids = list(sampled_ids)
        if self.ends_with_end_of_turn(ids):
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _scaffolding_ids(self, text: str, sampled_end_of_turn_id: int | None) -> list[int]:
        ids = self.encode(text)
        # The policy already sampled the template's end-of-turn token: it must not appear twice.
        if sampled_end_of_turn_id is not None and ids and ids[0] == sampled_end_of_turn_id:
            ids = ids[1:]
        return ids

    def tool_turn_ids(
        self, messages: Sequence[dict[str, str]], tool_content: str, *, sampled_end_of_turn: bool
    ) -> list[int]:
        """Mask-0 ids to append after a sampled assistant turn: the rest of that turn, the tool turn
        holding ``tool_content`` and the next generation prompt, as the template renders them.

        ``messages`` is the conversation so far (only its leading system/user messages are used);
        ``sampled_end_of_turn`` says the sampled turn already ends with the template's end-of-turn
        token.
        """
        if not isinstance(tool_content, str):
            raise TypeError(f"tool_content must be a str, got {type(tool_content).__name__}")
        text = self._text_after_assistant(self._head(messages), tool_content)
        return self._scaffolding_ids(text, self.end_of_turn_id if sampled_end_of_turn else None)

    def closing_ids(self, messages: Sequence[dict[str, str]], *, sampled_end_of_turn: bool) -> list[int]:
        """Mask-0 ids the template puts after the last assistant turn of a finished conversation."""
        text = self._text_after_assistant(self._head(messages), None)
        return self._scaffolding_ids(text, self.end_of_turn_id if sampled_end_of_turn else None)

    # ---------------------------------------------------------------- building a trajectory

    def start_trajectory(self, messages: Sequence[dict[str, str]], **fields_: Any) -> Trajectory:
        """A new trajectory holding the prompt ``messages`` (mask 0); ``fields_`` set record fields
        (``problem_id``, ``sample_index``, ``gold``, ``metadata``)."""
        messages = _check_messages(messages)
        if messages[-1]["role"] == "assistant":
            raise ValueError("messages of a prompt must not end with an assistant turn")
        trajectory = Trajectory(messages=[dict(m) for m in messages], **fields_)
        trajectory.append_tokens(self.prompt_ids(messages), sampled=False)
        return trajectory

    def add_assistant_turn(self, trajectory: Trajectory, sampled_ids: Sequence[int]) -> str:
        """Append a sampled turn (mask 1, ids as sampled) and its text as an assistant message."""
        if trajectory.messages and trajectory.messages[-1]["role"] == "assistant":
            raise ValueError("the trajectory already ends with an assistant turn; add a tool turn first")
        content = self.assistant_content(sampled_ids)
        trajectory.append_tokens(sampled_ids, sampled=True)
        trajectory.messages.append({"role": "assistant", "content": content})
        return content

    def _last_turn_sampled_end_of_turn(self, trajectory: Trajectory) -> bool:
        if not trajectory.messages or trajectory.messages[-1]["role"] != "assistant":
            raise ValueError("the trajectory must end with an assistant turn here")
        return (
            bool(trajectory.policy_mask)
            and trajectory.policy_mask[-1] == 1
            and trajectory.input_ids[-1] == self.end_of_turn_id
        )

    def next_tool_turn_ids(self, trajectory: Trajectory, tool_content: str) -> list[int]:
        """:meth:`tool_turn_ids` for the current end of ``trajectory`` (not appended)."""
        return self.tool_turn_ids(
            trajectory.messages, tool_content, sampled_end_of_turn=self._last_turn_sampled_end_of_turn(trajectory)
        )

    def add_tool_turn(self, trajectory: Trajectory, tool_content: str, ids: Sequence[int] | None = None) -> None:
        """Append the tool turn after the last assistant turn (mask 0). ``ids``: the result of
        :meth:`next_tool_turn_ids` when the caller already computed it."""
        if ids is None:
            ids = self.next_tool_turn_ids(trajectory, tool_content)
        else:
            self._last_turn_sampled_end_of_turn(trajectory)  # checks the trajectory ends with a turn
        trajectory.append_tokens(ids, sampled=False)
        trajectory.messages.append({"role": "tool", "content": tool_content})

    def close_trajectory(self, trajectory: Trajectory) -> None:
        """Append the template's closing scaffolding after the final assistant turn (mask 0). Call once."""
        trajectory.append_tokens(
            self.closing_ids(
                trajectory.messages, sampled_end_of_turn=self._last_turn_sampled_end_of_turn(trajectory)
            ),
            sampled=False,
        )

    def trajectory_from_messages(self, messages: Sequence[dict[str, str]], **fields_: Any) -> Trajectory:
        """The trajectory of a finished conversation, as if the policy had sampled its assistant
        turns (e.g. SFT data from :func:`lmforge.agent.tasks.solution_messages`).

        Each assistant content is tokenised on its own; an assistant turn followed by a tool turn is
        taken to have been stopped at the end of its code block (no end-of-turn token sampled, as in
        a rollout), the final assistant turn to end with the template's end-of-turn token.
        """
        messages = _check_messages(messages)
        first_assistant = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
        if first_assistant is None:
            raise ValueError("messages must contain at least one assistant turn")
        if messages[-1]["role"] != "assistant":
            raise ValueError("a finished conversation must end with an assistant turn")
        trajectory = self.start_trajectory(messages[:first_assistant], **fields_)
        for index in range(first_assistant, len(messages)):
            message = messages[index]
            if message["role"] == "assistant":
                sampled = self.encode(message["content"])
                if index == len(messages) - 1 and self.stop_token_ids:
                    sampled.append(self.stop_token_ids[0])  # the end-of-turn token when the template has one
                self.add_assistant_turn(trajectory, sampled)
                trajectory.messages[-1]["content"] = message["content"]
            elif message["role"] == "tool":
                self.add_tool_turn(trajectory, message["content"])
            else:
                raise ValueError(
                    f"messages[{index}] has role {message['role']!r}; after the first assistant turn only "
                    "assistant and tool turns may follow"
                )
        self.close_trajectory(trajectory)
        return trajectory


# --------------------------------------------------------------------------------------------
# JSON lines
# --------------------------------------------------------------------------------------------

_FIELD_NAMES = tuple(f.name for f in fields(Trajectory))


def trajectory_to_json(trajectory: Trajectory) -> str:
    """One JSON line (no newline) holding every field of ``trajectory``."""
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"trajectory must be a Trajectory, got {type(trajectory).__name__}")
    if len(trajectory.input_ids) != len(trajectory.policy_mask):
        raise ValueError(
            f"trajectory {trajectory.key()}: input_ids has {len(trajectory.input_ids)} tokens but policy_mask "
            f"has {len(trajectory.policy_mask)}"
        )
    return json.dumps(asdict(trajectory), ensure_ascii=False, allow_nan=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"value of type {type(value).__name__} is not JSON serialisable")


def trajectory_from_json(line: str | dict) -> Trajectory:
    """The :class:`Trajectory` of one JSON line (or its parsed dict); ValueError on a bad record."""
    record = json.loads(line) if isinstance(line, str) else line
    if not isinstance(record, dict):
        raise ValueError(f"a trajectory record must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_FIELD_NAMES))
    if unknown:
        raise ValueError(f"unknown trajectory field(s) {unknown}; known: {list(_FIELD_NAMES)}")
    ids, mask = record.get("input_ids"), record.get("policy_mask")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError("trajectory field 'input_ids' must be a list of ints")
    if not isinstance(mask, list) or any(m not in (0, 1) or isinstance(m, bool) for m in mask):
        raise ValueError("trajectory field 'policy_mask' must be a list of 0/1 ints")
    if len(ids) != len(mask):
        raise ValueError(f"trajectory has {len(ids)} input_ids but {len(mask)} policy_mask entries")
    if "messages" in record:
        record["messages"] = _check_messages(record["messages"], "trajectory field 'messages'")
    return Trajectory(**record)


def append_trajectory(path: str | os.PathLike, trajectory: Trajectory) -> None:
    """Append one trajectory as a JSON line and flush it to disk (fsync), so a crash right after
    the call loses nothing. The line is built first, so a bad record never leaves a partial line."""
    line = trajectory_to_json(trajectory) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def write_trajectories(path: str | os.PathLike, trajectories: Iterable[Trajectory]) -> None:
    """Write ``trajectories`` as a JSON lines file, atomically (temporary file, then rename)."""
    write_text_atomic(path, "".join(trajectory_to_json(t) + "\n" for t in trajectories))


def read_trajectories(path: str | os.PathLike, *, repair: bool = False) -> list[Trajectory]:
    """The trajectories of a JSON lines file, in file order.

    A last line without its newline that does not parse is a write cut short by a crash: it is
    skipped with a warning, and with ``repair=True`` cut from the file (a complete last record
    that only lacks its newline gets one), so that appends can follow. Any other bad line raises
    ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file {path} does not exist")
    data = path.read_bytes()
    newline = data.rfind(b"\n")
    terminated, tail = data[: newline + 1], data[newline + 1 :]
    trajectories = []
    for number, raw in enumerate(terminated.split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            trajectories.append(trajectory_from_json(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a valid trajectory record ({error})") from None
    if tail.strip():
        try:
            trajectories.append(trajectory_from_json(tail.decode("utf-8")))
        except (ValueError, UnicodeDecodeError, TypeError):
            logger.warning("%s: skipping a torn last line (%d bytes, no newline)", path, len(tail))
            if repair:
                os.truncate(path, len(terminated))
        else:
            if repair:
                with open(path, "a", encoding="utf-8") as handle:
                    handle.write("\n")
    elif tail and repair:  # only blanks after the last newline
        os.truncate(path, len(terminated))
    return trajectories
