"""Tests of lmforge.agent.format: token-exact trajectories across chat-template styles.

The tiny random models of the model families have no tokenizer, so every template here runs on the
embedded SmolLM2 tokenizer, with each family's control tokens added as special tokens and its chat
template (a small but faithful version of the real one) set as ``tokenizer.chat_template``.

References are independent of the code under test: for prefix-stable templates, the ids must be
what ``apply_chat_template`` gives for the whole conversation and the mask must equal one built
from the tokenizer's character offsets of the assistant contents in that rendering; for templates
that re-render earlier turns (Qwen3, Mistral v0.3) the expected text is written out by hand.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lmforge.agent.format import (
    ChatFormat,
    Trajectory,
    append_trajectory,
    policy_spans,
    read_trajectories,
    trajectory_from_json,
    trajectory_to_json,
    write_trajectories,
)
from lmforge.agent.tasks import code_block, generate_problems, output_block, solution_messages
from tests.models.conftest import TINY_MODEL_FAMILIES

pytestmark = pytest.mark.timeout(120)

# ------------------------------------------------------------------ templates of the families

LLAMA3 = (
    "{{- '<|begin_of_text|>' }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = 'Cutting Knowledge Date: December 2023' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}"
    "{%- for message in loop_messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

QWEN2 = (
    "{%- for message in messages %}"
    "{%- if loop.first and message.role != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3: the <think> part of an assistant turn is rendered only for turns after the last real user
# query (and only for the last turn when it is empty), so earlier turns change as the chat grows.
QWEN3 = (
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and not (message.content.startswith('<tool_response>')"
    " and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

GEMMA = (
    "{{ '<bos>' }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

# Gemma 3: the system prompt is folded into the first user turn.
GEMMA3 = (
    "{{ '<bos>' }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim -}}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Phi-3: unknown roles are silently dropped, and a finished conversation ends with eos.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Mistral (v0.1): no generation prompt; the assistant turn ends with eos.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Mistral v0.3: the system prompt is put in front of the *last* user turn.
MISTRAL_V03 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def _style(template, specials=(), eos=None, bos=None, tool_role="tool", system=True, kwargs=None, end_of_turn=None):
    return dict(template=template, specials=specials, eos=eos, bos=bos, tool_role=tool_role, system=system,
                kwargs=kwargs or {}, end_of_turn=end_of_turn)


LLAMA3_STYLE = _style(LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                      eos="<|eot_id|>", end_of_turn="<|eot_id|>")
GEMMA_STYLE = _style(GEMMA, ("<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"), eos="<eos>",
                     tool_role="user", system=False, end_of_turn="<end_of_turn>")
STYLES = {
    "smollm2": None,  # the tokenizer's own ChatML template
    "llama": LLAMA3_STYLE,
    "mistral": _style(MISTRAL, ("<s>", "</s>"), eos="</s>", bos="<s>", tool_role="user", system=False,
                      end_of_turn="</s>"),
    "qwen2": _style(QWEN2, end_of_turn="<|im_end|>"),
    "qwen3": _style(QWEN3, end_of_turn="<|im_end|>"),
    "gemma": GEMMA_STYLE,
    "gemma2": GEMMA_STYLE,
    "gemma3_text": _style(GEMMA3, ("<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"), eos="<eos>",
                          tool_role="user", end_of_turn="<end_of_turn>"),
    "phi3": _style(PHI3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), eos="<|endoftext|>",
                   tool_role="user", end_of_turn="<|end|>"),
}
assert set(TINY_MODEL_FAMILIES) <= set(STYLES), "every model family needs a chat template here"


@pytest.fixture(scope="module")
def base_tokenizer():
    from transformers import AutoTokenizer

    from lmforge.models.loading import embedded_model_folder

    return AutoTokenizer.from_pretrained(embedded_model_folder())


def make_tokenizer(base, style):
    """A copy of the SmolLM2 tokenizer speaking ``style``'s template, with its control tokens."""
    tokenizer = copy.deepcopy(base)
    if style is None:
        return tokenizer
    if style["specials"]:
        tokenizer.add_special_tokens({"additional_special_tokens": list(style["specials"])})
    if style["eos"]:
        tokenizer.eos_token = style["eos"]
    if style["bos"]:
        tokenizer.bos_token = style["bos"]
    tokenizer.chat_template = style["template"]
    return tokenizer


# ------------------------------------------------------------------ a conversation with two tool calls

QUESTION = "A shop sells 12 boxes of 15 pencils and 7 more pencils. How many pencils is that?"
SYSTEM = "Solve math problems with Python, then give the answer in \\boxed{}."
TURN_1 = "I will count the boxed pencils first.\n\n" + code_block("boxed = 12 * 15\nprint(boxed)")
TOOL_1 = output_block("180")
TURN_2 = "Now add the loose pencils.\n\n" + code_block("print(boxed + 7)")
TOOL_2 = output_block("187")
FINAL = "There are 187 pencils, so the answer is \\boxed{187}."


def conversation(system: bool) -> list[dict[str, str]]:
    head = [{"role": "system", "content": SYSTEM}] if system else []
    return head + [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": TURN_1},
        {"role": "tool", "content": TOOL_1},
        {"role": "assistant", "content": TURN_2},
        {"role": "tool", "content": TOOL_2},
        {"role": "assistant", "content": FINAL},
    ]


def build_incrementally(chat: ChatFormat, messages, eos_after_code: bool) -> Trajectory:
    """Drive ChatFormat the way the rollout loop does, with the assistant turns as 'sampled' ids.

    Turns with code are stopped at the closing fence (no end-of-turn token) unless
    ``eos_after_code``: then the policy sampled the end-of-turn token after the block itself.
    """
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    trajectory = chat.start_trajectory(messages[:first])
    for index in range(first, len(messages)):
        message = messages[index]
        if message["role"] == "assistant":
            sampled = chat.encode(message["content"])
            if index == len(messages) - 1 or eos_after_code:
                sampled.append(chat.end_of_turn_id)
            assert chat.add_assistant_turn(trajectory, sampled) == message["content"]
        else:
            chat.add_tool_turn(trajectory, message["content"])
    chat.close_trajectory(trajectory)
    return trajectory


def reference_mask(tokenizer, ids: list[int], text: str, contents: list[str], end_of_turn: str) -> list[int]:
    """The mask from character positions: 1 for tokens that lie inside an assistant content (found
    in order in ``text``, the template's rendering) or are the end-of-turn token after the last one.
    ``ids`` must decode to ``text`` token by token (true for these ASCII conversations)."""
    spans, position = [], 0
    for content in contents:
        start = text.index(content, position)
        spans.append((start, start + len(content)))
        position = start + len(content)
    assert text.startswith(end_of_turn, position)
    spans.append((position, position + len(end_of_turn)))
    mask, offset = [], 0
    for token in ids:
        piece = tokenizer.decode([token])
        mask.append(int(any(s <= offset and offset + len(piece) <= e for s, e in spans)))
        offset += len(piece)
    assert offset == len(text)
    return mask


# SmolLM2's GPT-2 style pre-tokenizer makes "\n\n" at the end of a text one token but splits
# "\n\nI" into "\n", "\n", "I", so Llama-3's generation prompt "<|end_header_id|>\n\n" tokenises
# differently alone (what the policy sees) than inside a longer text. (The real Llama-3 tokenizer
# keeps "\n\n" whole in both.) For that family, re-tokenised references are compared as text.
TOKEN_BOUNDARY_UNSTABLE = {"llama"}
NOT_PREFIX_STABLE = {"qwen3"}


@pytest.mark.parametrize("family", sorted(STYLES))
def test_ids_and_mask_equal_the_template_rendering(base_tokenizer, family):
    style = STYLES[family]
    tokenizer = make_tokenizer(base_tokenizer, style)
    chat = ChatFormat(tokenizer, tool_role=style["tool_role"] if style else "tool")
    messages = conversation(system=style["system"] if style else True)
    eot_text = style["end_of_turn"] if style else "<|im_end|>"
    assert chat.end_of_turn_id == tokenizer.convert_tokens_to_ids(eot_text)  # read from the template
    assert set(chat.stop_token_ids) == {chat.end_of_turn_id, tokenizer.eos_token_id}

    trajectory = build_incrementally(chat, messages, eos_after_code=False)
    template_messages = chat.template_messages(messages)
    full_text = tokenizer.apply_chat_template(template_messages, tokenize=False)
    if family in NOT_PREFIX_STABLE:
        # Qwen3 renders an empty <think></think> in front of the *last* assistant turn only, so the
        # whole chat re-rendered differs; the ids are the final prompt, the answer and the turn's end.
        assert tokenizer.decode(trajectory.input_ids) != full_text
        full_text = tokenizer.apply_chat_template(template_messages[:-1], add_generation_prompt=True,
                                                  tokenize=False) + FINAL + "<|im_end|>\n"
    assert tokenizer.decode(trajectory.input_ids) == full_text
    if family not in TOKEN_BOUNDARY_UNSTABLE | NOT_PREFIX_STABLE:
        assert trajectory.input_ids == tokenizer.apply_chat_template(template_messages, return_dict=False)
    # Before every assistant turn the ids are exactly the prompt apply_chat_template gives the policy.
    spans = policy_spans(trajectory.policy_mask)
    turn_indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(spans) == len(turn_indices) == 3
    for (start, _), index in zip(spans, turn_indices):
        prompt = tokenizer.apply_chat_template(template_messages[:index], add_generation_prompt=True,
                                               return_dict=False)
        if family in TOKEN_BOUNDARY_UNSTABLE and index > turn_indices[0]:
            assert tokenizer.decode(trajectory.input_ids[:start]) == tokenizer.decode(prompt)
        else:
            assert trajectory.input_ids[:start] == prompt
    contents = [m["content"] for m in messages if m["role"] == "assistant"]
    assert trajectory.policy_mask == reference_mask(tokenizer, trajectory.input_ids, full_text, contents, eot_text)

    # Mask-1 runs decode to exactly the assistant contents (the final one with its end-of-turn token).
    runs = [tokenizer.decode(trajectory.input_ids[s:e]) for s, e in spans]
    assert runs == [TURN_1, TURN_2, FINAL + eot_text]
    assert trajectory.num_policy_tokens == sum(len(chat.encode(c)) for c in contents) + 1
    # The tool output is in the ids, never under the mask.
    for tool in (TOOL_1, TOOL_2):
        assert tool in tokenizer.decode([t for t, m in zip(trajectory.input_ids, trajectory.policy_mask) if not m])
    assert trajectory.messages == messages


@pytest.mark.parametrize("family", ["smollm2", "llama", "qwen2", "phi3", "gemma"])
def test_a_sampled_end_of_turn_token_is_kept_once_with_mask_1(base_tokenizer, family):
    style = STYLES[family]
    tokenizer = make_tokenizer(base_tokenizer, style)
    chat = ChatFormat(tokenizer, tool_role=style["tool_role"] if style else "tool")
    messages = conversation(system=style["system"] if style else True)
    trajectory = build_incrementally(chat, messages, eos_after_code=True)
    full_text = chat.render(messages, add_generation_prompt=False)
    assert tokenizer.decode(trajectory.input_ids) == full_text
    if family not in TOKEN_BOUNDARY_UNSTABLE:
        assert trajectory.input_ids == chat.encode(full_text)
    runs = [tokenizer.decode(trajectory.input_ids[s:e]) for s, e in policy_spans(trajectory.policy_mask)]
    eot_text = tokenizer.decode([chat.end_of_turn_id])
    assert runs == [TURN_1 + eot_text, TURN_2 + eot_text, FINAL + eot_text]


# ------------------------------------------------------------------ templates that are not prefix-stable


def test_qwen3_without_thinking_appends_only_the_new_segment(base_tokenizer):
    tokenizer = make_tokenizer(base_tokenizer, STYLES["qwen3"])
    chat = ChatFormat(tokenizer, chat_template_kwargs={"enable_thinking": False})
    messages = conversation(system=False)
    trajectory = build_incrementally(chat, messages, eos_after_code=False)
    empty_think = "<think>\n\n</think>\n\n"
    expected = (
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{empty_think}{TURN_1}<|im_end|>\n"
        f"<|im_start|>user\n<tool_response>\n{TOOL_1}\n</tool_response><|im_end|>\n"
        f"<|im_start|>assistant\n{empty_think}{TURN_2}<|im_end|>\n"
        f"<|im_start|>user\n<tool_response>\n{TOOL_2}\n</tool_response><|im_end|>\n"
        f"<|im_start|>assistant\n{empty_think}{FINAL}<|im_end|>\n"
    )
    assert tokenizer.decode(trajectory.input_ids) == expected
    # Re-rendering the whole chat drops the empty thinking blocks of earlier turns: not prefix-stable.
    assert chat.render(messages, add_generation_prompt=False) != expected
    runs = [tokenizer.decode(trajectory.input_ids[s:e]) for s, e in policy_spans(trajectory.policy_mask)]
    assert runs == [TURN_1, TURN_2, FINAL + "<|im_end|>"]


def test_qwen3_thinking_with_tool_output_as_user_keeps_the_sampled_thoughts(base_tokenizer):
    tokenizer = make_tokenizer(base_tokenizer, STYLES["qwen3"])
    chat = ChatFormat(tokenizer, tool_role="user")
    think = "<think>\nMultiply first, then add.\n</think>\n\n"
    messages = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": think + TURN_1},
        {"role": "tool", "content": TOOL_1},
        {"role": "assistant", "content": think + FINAL},
    ]
    trajectory = build_incrementally(chat, messages, eos_after_code=False)
    expected = (
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{think}{TURN_1}<|im_end|>\n"
        f"<|im_start|>user\n{TOOL_1}<|im_end|>\n<|im_start|>assistant\n{think}{FINAL}<|im_end|>\n"
    )
    assert tokenizer.decode(trajectory.input_ids) == expected
    assert "Multiply first" not in chat.render(messages[:3], add_generation_prompt=True)  # what Qwen3 re-renders
    runs = [tokenizer.decode(trajectory.input_ids[s:e]) for s, e in policy_spans(trajectory.policy_mask)]
    assert runs == [think + TURN_1, think + FINAL + "<|im_end|>"]


def test_mistral_v03_system_prompt_moves_to_the_newest_user_turn(base_tokenizer):
    style = _style(MISTRAL_V03, ("<s>", "</s>"), eos="</s>", bos="<s>")
    tokenizer = make_tokenizer(base_tokenizer, style)
    chat = ChatFormat(tokenizer, tool_role="user")
    # Mistral has no generation prompt: the model itself samples the space after [/INST].
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": " " + TURN_1},
        {"role": "tool", "content": TOOL_1},
        {"role": "assistant", "content": " " + FINAL},
    ]
    trajectory = build_incrementally(chat, messages, eos_after_code=False)
    expected = (
        f"<s>[INST] {SYSTEM}\n\n{QUESTION}[/INST] {TURN_1}</s>"
        f"[INST] {SYSTEM}\n\n{TOOL_1}[/INST] {FINAL}</s>"
    )
    assert tokenizer.decode(trajectory.input_ids) == expected
    assert chat.render(messages, add_generation_prompt=False) != expected  # not prefix-stable
    assert chat.end_of_turn_id == tokenizer.convert_tokens_to_ids("</s>")
    runs = [tokenizer.decode(trajectory.input_ids[s:e]) for s, e in policy_spans(trajectory.policy_mask)]
    assert runs == [" " + TURN_1, " " + FINAL + "</s>"]


# ------------------------------------------------------------------ templates without a tool role


@pytest.mark.parametrize("family", ["gemma", "mistral", "phi3"])
def test_templates_without_a_tool_role_are_refused_with_a_hint(base_tokenizer, family):
    tokenizer = make_tokenizer(base_tokenizer, STYLES[family])
    with pytest.raises(ValueError, match="tool_role='user'"):
        ChatFormat(tokenizer, tool_role="tool")
    ChatFormat(tokenizer, tool_role="user")  # works


def test_bad_arguments(base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)
    with pytest.raises(ValueError, match="tool_role"):
        ChatFormat(tokenizer, tool_role="ipython")
    with pytest.raises(TypeError, match="tokenizer"):
        ChatFormat("not a tokenizer")
    with pytest.raises(TypeError, match="chat_template_kwargs"):
        ChatFormat(tokenizer, chat_template_kwargs=["enable_thinking"])
    chat = ChatFormat(tokenizer)
    with pytest.raises(ValueError, match="role"):
        chat.prompt_ids([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="messages"):
        chat.prompt_ids([])
    trajectory = chat.start_trajectory([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="assistant turn"):
        chat.add_tool_turn(trajectory, "```output\n1\n```")
    chat.add_assistant_turn(trajectory, chat.encode("ok"))
    with pytest.raises(ValueError, match="already ends with an assistant turn"):
        chat.add_assistant_turn(trajectory, chat.encode("again"))
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        ChatFormat(tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # drops all content
    with pytest.raises(ValueError, match="verbatim"):
        ChatFormat(tokenizer)


# ------------------------------------------------------------------ SFT conversations and JSON lines


def test_trajectory_from_messages_matches_a_rollout_of_the_same_turns(base_tokenizer):
    chat = ChatFormat(base_tokenizer)
    for problem in generate_problems(6, seed=3):
        messages = solution_messages(problem)
        from_messages = chat.trajectory_from_messages(messages, problem_id=problem.id, gold=problem.answer)
        incremental = build_incrementally(chat, messages, eos_after_code=False)
        assert from_messages.input_ids == incremental.input_ids
        assert from_messages.policy_mask == incremental.policy_mask
        assert from_messages.messages == messages
        assert from_messages.problem_id == problem.id and from_messages.gold == problem.answer


def sample_trajectory(chat: ChatFormat, index: int) -> Trajectory:
    trajectory = chat.trajectory_from_messages(conversation(system=True), problem_id=f"p{index}", sample_index=index,
                                               gold="187")
    trajectory.correct, trajectory.predicted, trajectory.finish_reason = True, "187", "end_of_turn"
    trajectory.tool_calls = [{"code": "print(12 * 15)", "output": "180\n", "ok": True, "error_kind": None,
                              "error": None, "elapsed_s": 0.01, "truncated": False}]
    trajectory.errors = ["grading timed out"] if index % 2 else []
    trajectory.metadata = {"source": "generated", "level": 2, "note": "ünïcode ✓"}
    return trajectory


def test_json_lines_round_trip(base_tokenizer, tmp_path):
    chat = ChatFormat(base_tokenizer)
    trajectories = [sample_trajectory(chat, i) for i in range(3)]
    line = trajectory_to_json(trajectories[0])
    assert "\n" not in line and json.loads(line)["problem_id"] == "p0"
    assert trajectory_from_json(line) == trajectories[0]
    path = tmp_path / "out" / "rollouts.jsonl"
    write_trajectories(path, trajectories[:2])
    append_trajectory(path, trajectories[2])
    assert read_trajectories(path) == trajectories
    assert [p.name for p in path.parent.iterdir()] == ["rollouts.jsonl"]  # no temporary files left


def test_a_torn_last_line_is_skipped_and_repaired(base_tokenizer, tmp_path):
    chat = ChatFormat(base_tokenizer)
    trajectories = [sample_trajectory(chat, i) for i in range(2)]
    path = tmp_path / "rollouts.jsonl"
    write_trajectories(path, trajectories[:1])
    whole = trajectory_to_json(trajectories[1])
    with open(path, "a") as handle:
        handle.write(whole[: len(whole) // 2])  # a crash in the middle of a write
    assert read_trajectories(path) == trajectories[:1]
    assert read_trajectories(path, repair=True) == trajectories[:1]
    append_trajectory(path, trajectories[1])
    assert read_trajectories(path) == trajectories
    # A complete last record that lost only its newline is kept, and repaired for the next append.
    path.write_text(whole)
    assert read_trajectories(path, repair=True) == trajectories[1:]
    append_trajectory(path, trajectories[0])
    assert read_trajectories(path) == [trajectories[1], trajectories[0]]


def test_bad_records_name_the_line(base_tokenizer, tmp_path):
    chat = ChatFormat(base_tokenizer)
    good = trajectory_to_json(sample_trajectory(chat, 0))
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n{not json\n" + good + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_trajectories(path)
    record = json.loads(good)
    record["policy_mask"] = record["policy_mask"][:-1]
    with pytest.raises(ValueError, match="policy_mask"):
        trajectory_from_json(json.dumps(record))
    record = json.loads(good)
    record["policy_mask"][0] = 2
    with pytest.raises(ValueError, match="0/1"):
        trajectory_from_json(json.dumps(record))
    record = json.loads(good)
    record["surprise"] = 1
    with pytest.raises(ValueError, match="surprise"):
        trajectory_from_json(json.dumps(record))
    with pytest.raises(FileNotFoundError):
        read_trajectories(tmp_path / "missing.jsonl")
    broken = Trajectory(input_ids=[1, 2], policy_mask=[0])
    with pytest.raises(ValueError, match="policy_mask"):
        trajectory_to_json(broken)
    with pytest.raises(ValueError, match="policy_mask"):
        append_trajectory(Path(tmp_path / "never.jsonl"), broken)
    assert not (tmp_path / "never.jsonl").exists()


def test_policy_spans():
    assert policy_spans([]) == []
    assert policy_spans([0, 1, 1, 0, 0, 1]) == [(1, 3), (5, 6)]
    assert policy_spans([1, 1]) == [(0, 2)]
