"""Datasets: read and validate rows, render them with the model's own chat template, and
mark the tokens the loss is computed on (every assistant turn, not only the last).

What an assistant turn trains is what the model must emit at inference: the continuation of
the generation prompt that `chat` / `generate` send for the conversation so far (the
template's own `add_generation_prompt=True` rendering) up to and including the end-of-turn
marker, so the model learns to stop. Nothing is hard-coded per family: the continuation is
what the template adds for the turn beyond what it shares with the generation prompt.

- Templates whose generation prompt is the start of the rendered turn (Gemma 3, 3n, 4 E2B/E4B:
  `<start_of_turn>model\n` / `<|turn>model\n`) give one sequence per conversation with every
  assistant turn a target.
- Templates whose generation prompt differs from how a past turn renders (Gemma 4 26B-A4B /
  31B with thinking off: the prompt ends `<|turn>model\n<|channel>thought\n<channel|>`, a past
  turn renders `<|turn>model\n{answer}<turn|>`) give one sequence per assistant turn: exactly
  the generation prompt's tokens (masked), then the answer's (trained).

Reasoning (an assistant message's `reasoning_content` / `thinking` field, or a
`<|channel>thought\n...<channel|>` block at the start of its content) is trained as the model
produces it with thinking on (Gemma 4): the conversation rendered with `enable_thinking=True`, each
turn one sequence, its continuation `<|channel>thought\n{thought}<channel|>{answer}<turn|>`. The
template itself strips thoughts from past turns, as it does at inference. `data.reasoning` chooses
train (the default) / drop (answers only) / error; models without a thinking format refuse it.

Tool calling (tools.py: a row's `tools`, assistant `tool_calls`, `tool` results) renders through the
same template: an assistant turn that calls a tool trains the call and the `<|tool_response>` stop
token Gemma 4 ends it with; the results are prompt (masked); the answer after them trains as the
continuation of the template's generation prompt after tool results. Models whose template has
no tool format (Gemma 3, 3n) refuse such rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_gemma_tune import thinking
from mlx_gemma_tune import tools as tool_calling
from mlx_gemma_tune.errors import InputError
from mlx_gemma_tune.families import END_OF_TURN

REFUSED_HINT = ("make the row a conversation the model's template accepts (e.g. merge consecutive user turns, "
                "start with a user turn)")


@dataclass
class Example:
    tokens: list[int]
    mask: list[bool]  # True where the token is a training target (predicted from the one before)
    source: str  # "file:line", for messages
    extra: dict | None = None  # image / audio rows: numpy model inputs, e.g. pixel_values (see multimodal.py)
    text: str | None = None  # a chat row's rendered text (what the tokens encode; multimodal.py expands it)
    rejected: Example | None = None  # a preference pair's rejected answer (this Example is the chosen one)


def hf_tokenizer(tokenizer):
    """The transformers tokenizer inside mlx-lm's TokenizerWrapper, or the tokenizer itself."""
    inner = getattr(tokenizer, "_tokenizer", None)
    return inner if inner is not None and hasattr(inner, "apply_chat_template") else tokenizer


def render(hf_tokenizer, messages: list[dict], generation_prompt: bool, where: str = "", **template_args) -> str:
    """The chat template's text for `messages` (transformers' apply_chat_template, tokenize=False;
    template_args such as enable_thinking go to the template).

    Raises InputError naming `where` when the template refuses the conversation (its
    raise_exception, e.g. Gemma 3's "Conversation roles must alternate ...")."""
    from jinja2.exceptions import TemplateError

    try:
        return hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                **template_args)
    except TemplateError as exc:
        raise InputError(f"the model's chat template refuses this conversation ({exc})", where=where,
                         hint=REFUSED_HINT) from None


_STAND_IN = "MgtStandInAnswer7431"  # an answer no template rewrites, to find where answers start


@dataclass
class Turn:
    """One assistant turn as inference sees it: `prompt` is the template's generation prompt for the
    messages before it, `answer` the text the model must emit after it (end-of-turn included)."""
    prompt: str
    answer: str
    in_context: bool  # prompt + answer is also how the template renders the turn after its history


def assistant_turns(hf, messages: list[dict], where: str = "", **template_args) -> tuple[str, list[Turn]]:
    """(the whole conversation's text, every assistant turn split into generation prompt and
    continuation)."""
    if messages and messages[0]["role"] == "assistant":
        raise InputError("starts with an assistant turn; the model can only answer a user", where=where,
                         hint="start the conversation with a user turn (after an optional system prompt)")
    full = render(hf, messages, False, where, **template_args)
    turns = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        history = render(hf, messages[:i], False, where, **template_args)
        prompt = render(hf, messages[:i], True, where, **template_args)
        upto = render(hf, messages[: i + 1], False, where, **template_args)
        # the turn's header (e.g. '<|turn>model\n'): where a stand-in answer starts in the same rendering
        stand_in = render(hf, [*messages[:i], {"role": "assistant", "content": _STAND_IN}], False, where,
                          **template_args)
        at = stand_in.find(_STAND_IN, len(history))
        header = stand_in[len(history):at]
        if not (at >= 0 and prompt.startswith(history) and upto.startswith(history + header)
                and full.startswith(upto)):
            raise InputError(f"the chat template renders turn {i} differently in context, so its loss mask "
                             "cannot be found", where=where)
        answer = upto[len(history) + len(header):]
        turns.append(Turn(prompt, answer, prompt + answer == upto))
    return full, turns


def split_reasoning(message: dict) -> tuple[str | None, str]:
    """(thought, answer) of an assistant message: its `reasoning_content` field (dataset_files keeps
    `thinking` under that name), or a `<|channel>thought ... <channel|>` block opening its content;
    (None, content) when it has neither."""
    content = message.get("content") or ""
    if isinstance(content, list):  # content parts (multimodal.hf_messages): an assistant turn is text only
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    if message.get("reasoning_content"):
        return message["reasoning_content"], content
    return thinking.split(content)


def has_reasoning(messages: list[dict]) -> bool:
    """True when an assistant message of the conversation carries a thought (split_reasoning)."""
    return any(m["role"] == "assistant" and split_reasoning(m)[0] is not None for m in messages)


def can_think(hf) -> bool:
    """The tokenizer has Gemma 4's thinking markers (Gemma 3 / 3n have none)."""
    vocab = hf.get_vocab()
    return all(t in vocab for t in ("<|channel>", "<channel|>", "<|think|>"))


def default_reasoning(tokenizer) -> str:
    """data.reasoning for commands without a recipe (eval, data check): rows with reasoning count as
    training would count them on a model that thinks (Gemma 4), and by their answers alone on one
    that does not."""
    return "train" if can_think(hf_tokenizer(tokenizer)) else "drop"


def _answers_only(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m["role"] == "assistant":
            m = {k: v for k, v in m.items() if k != "reasoning_content"} | {"content": split_reasoning(m)[1]}
        out.append(m)
    return out


def encode_conversation(tokenizer, messages: list[dict], where: str = "", reasoning: str = "train",
                        tools: list[dict] | None = None, last_turn_only: bool = False) -> list[Example]:
    """Tokens and loss masks of a conversation: one Example, or one per assistant turn (module doc).

    Every Example's masked prefix before a trained turn is token for token what `chat` / `generate`
    send as the prompt at that point (with thinking on, for rows that carry reasoning). `reasoning`
    is data.reasoning: train / drop / error; `tools` the row's function declarations. Raises
    InputError (naming `where`) when the template refuses the conversation or renders a turn
    inconsistently, when reasoning is refused, when the model has no thinking format to train it
    in, or no tool format for a row that uses tools. last_turn_only: one Example, the last assistant
    turn's generation prompt (masked) and answer (a preference pair's answers share that prompt)."""
    hf = hf_tokenizer(tokenizer)
    template_args = {"tools": tools} if tools else {}
    if tool_calling.has_tool_use(messages, tools) and not tool_calling.can_call_tools(hf):
        raise InputError("uses tools, but this model's chat template has no tool-calling format (Gemma 4's has)",
                         where=where, hint="train tool calling on a Gemma 4 model, or leave these rows out")
    thoughts = [split_reasoning(m)[0] for m in messages if m["role"] == "assistant"]
    if any(t is not None for t in thoughts):
        if reasoning == "error":
            raise InputError("carries reasoning (a thought before the answer) and data.reasoning is error",
                             where=where, hint="set data.reasoning to train (Gemma 4) or drop")
        if reasoning == "train" and not can_think(hf):
            raise InputError("carries reasoning, but this model has no thinking format (Gemma 4 has one)",
                             where=where, hint="set data.reasoning: drop to train the answers only")
        messages = _answers_only(messages)
    if reasoning == "train" and any(t is not None for t in thoughts):
        _, turns = assistant_turns(hf, messages, where, enable_thinking=True, **template_args)
        out = [_sequence(hf, t.prompt, _with_thought(t.prompt, thought, t.answer), where)
               for t, thought in zip(turns, thoughts)]
        return out[-1:] if last_turn_only else out
    full, turns = assistant_turns(hf, messages, where, **template_args)
    if last_turn_only:
        return [_sequence(hf, turns[-1].prompt, turns[-1].answer, where)]
    if all(t.in_context for t in turns):
        return [_whole(hf, full, turns, where)]
    return [_sequence(hf, t.prompt, t.answer, where) for t in turns]


def _with_thought(prompt: str, thought: str | None, answer: str) -> str:
    """What the model writes after `prompt` with thinking on: its thought block, then the answer.
    A prompt that already opens the thought (Gemma 4 after tool results: '<|channel>thought\n')
    gets the rest of the block (an empty thought where the row has none)."""
    if prompt.endswith(thinking.THOUGHT_OPEN):
        return (thought or "") + thinking.THOUGHT_CLOSE + answer
    return (thinking.block(thought) if thought else "") + answer


def _sequence(hf, prompt: str, answer: str, where: str) -> Example:
    """prompt's tokens (masked; tokenized alone, as generation tokenizes it), then answer's (trained)."""
    p = list(hf(prompt, add_special_tokens=False)["input_ids"])
    a = list(hf(answer, add_special_tokens=False)["input_ids"])
    return Example(tokens=p + a, mask=[False] * len(p) + [True] * len(a), source=where, text=prompt + answer)


def encode_chat(tokenizer, messages: list[dict], where: str = "") -> Example:
    """The whole rendered conversation as one sequence, every assistant turn's tokens a target.

    Only for templates that render each turn as its generation prompt + answer (Gemma 3, 3n,
    4 E2B/E4B); others raise InputError (encode_conversation splits them per turn instead)."""
    hf = hf_tokenizer(tokenizer)
    full, turns = assistant_turns(hf, messages, where)
    if not all(t.in_context for t in turns):
        raise InputError("this model's chat template renders a past answer unlike its generation prompt (e.g. "
                         "Gemma 4 26B/31B's empty thought block), so the conversation cannot be one training "
                         "sequence", where=where, hint="train it as text rows, or on a Gemma 4 E2B/E4B model")
    return _whole(hf, full, turns, where)


def _whole(hf, full: str, turns: list[Turn], where: str) -> Example:
    """`full` tokenized at once, the tokens inside each turn's answer the targets (the text starts
    with every turn's prompt + answer)."""
    spans = [(len(t.prompt), len(t.prompt) + len(t.answer)) for t in turns]
    enc = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    tokens = list(enc["input_ids"])
    in_answer = [any(s <= start and end <= e for s, e in spans) and end > start
                 for start, end in enc["offset_mapping"]]
    # Token t is a target when it lies in an answer; the model predicts it from t-1.
    return Example(tokens=tokens, mask=in_answer, source=where, text=full)


def load_examples(tokenizer, path, max_seq_length: int | None = None, mask_prompt: bool = True,
                  reasoning: str = "train"):
    """Encoded examples of every row of a dataset (any format), and how many were truncated."""
    from mlx_gemma_tune import dataset_files

    examples, truncated = [], 0
    for row in dataset_files.read_rows(path):
        for ex in encode_row(tokenizer, row, mask_prompt, reasoning):
            if max_seq_length:
                fitted = fit_length(ex, max_seq_length, "truncate")
                truncated += fitted is not ex
                ex = fitted
            examples.append(ex)
    return examples, truncated


def with_targets(examples: list[Example], path, max_seq_length: int | None) -> tuple[list[Example], list[str]]:
    """(the examples that still have a target token, where the others came from) after truncation:
    a row cut before its answer starts teaches nothing and has no loss, so it is dropped, as `train`
    drops it. Raises InputError when none is left."""
    kept = [e for e in examples if sum(e.mask[1:])]
    dropped = [e.source for e in examples if not sum(e.mask[1:])]
    if not kept:
        cut = f" after truncation to {max_seq_length} tokens" if max_seq_length else ""
        raise InputError(f"no row has an answer token left{cut} (e.g. {dropped[0] if dropped else 'none'})",
                         where=str(path), hint="raise --max-seq-length, or check that the rows have answers")
    return kept, dropped


def batches(examples: list[Example], batch_size: int, pad_id: int = 0):
    """Yield (inputs, targets, mask) mlx arrays, right-padded to the longest row of each batch."""
    from mlx_gemma_tune import packing

    for start in range(0, len(examples), batch_size):
        yield packing.batch_arrays([[e] for e in examples[start:start + batch_size]], pad_id)[:3]


def encode_row(tokenizer, row, mask_prompt: bool = True, reasoning: str = "train", pairs: bool = False
               ) -> list[Example]:
    """Tokens and loss masks of a normalised dataset row (see dataset_files.Row): a chat row gives
    one Example or one per assistant turn (encode_conversation), a text row one (encode_text).

    pairs (preference objectives): a preference row gives one Example of its chosen answer with the
    rejected one as .rejected, both the same prompt tokens (the context's generation prompt) and an
    answer; other rows are an InputError. Without pairs, a preference row trains on its chosen answer."""
    if pairs:
        return [encode_pair(tokenizer, row, reasoning)]
    if row.messages is None:
        return [encode_text(tokenizer, row.text, row.where)[0]]
    examples = encode_conversation(tokenizer, row.messages, row.where, reasoning, tools=row.tools)
    if not mask_prompt:
        for ex in examples:
            ex.mask = [True] * len(ex.tokens)
    return examples


def encode_pair(tokenizer, row, reasoning: str = "train") -> Example:
    """A preference row's chosen answer (with the rejected one as .rejected) after the shared prompt."""
    if row.rejected is None:
        raise InputError(f"is a {row.fmt.replace('_', ' ')} row, but train.objective dpo / orpo learns from "
                         "preference pairs", where=row.where, hint='rows like {"prompt": ..., "chosen": ..., '
                                                                   '"rejected": ...}; or train.objective: sft')
    for key, msg in (("chosen", row.messages[-1]), ("rejected", row.rejected)):
        if not (msg["content"].strip() or msg.get("tool_calls") or msg.get("reasoning_content")):
            raise InputError(f"'{key}' is an empty answer", where=row.where)
    if row.messages[-1] == row.rejected:
        raise InputError("'chosen' and 'rejected' are the same answer: a pair must differ to teach a preference",
                         where=row.where)
    chosen = encode_conversation(tokenizer, row.messages, row.where, reasoning, row.tools, last_turn_only=True)[0]
    rejected = encode_conversation(tokenizer, row.messages[:-1] + [row.rejected], row.where, reasoning, row.tools,
                                   last_turn_only=True)[0]
    if _prompt_part(chosen) != _prompt_part(rejected):  # e.g. a thought in one answer only: thinking on for it
        raise InputError("'chosen' and 'rejected' are answered after different prompts (one carries reasoning, the "
                         "other not?): a pair must share its prompt", where=row.where,
                         hint="give both answers a thought, or neither")
    chosen.rejected = rejected
    return chosen


def _prompt_part(ex: Example) -> list[int]:
    return ex.tokens[: ex.mask.index(True)] if True in ex.mask else ex.tokens


def encode_text(tokenizer, text: str, where: str = "") -> tuple[Example, list[str]]:
    """A text row as `<bos> text <eos>`, every token a target, and what was adjusted to get there.

    Text exported with apply_chat_template(tokenize=False) already starts with `<bos>` and ends
    with the end-of-turn marker: such a row gets no second `<bos>`, and no `<eos>` after its
    final end-of-turn / `<eos>` (trailing newlines aside). The second value names each
    adjustment ("starts with <bos>", "ends with <end_of_turn>"), for `data check`."""
    hf = hf_tokenizer(tokenizer)
    ids = list(hf(text, add_special_tokens=False)["input_ids"])
    stops = {hf.eos_token_id} | {i for i in hf.convert_tokens_to_ids(list(END_OF_TURN)) if i != hf.unk_token_id}
    adjusted = []
    head = [hf.bos_token_id]
    if ids and ids[0] == hf.bos_token_id:
        head = []
        adjusted.append(f"starts with {hf.bos_token}")
    tail = [hf.eos_token_id]
    last = next((t for t in reversed(ids) if hf.decode([t]).strip() or t in stops), None)
    if last in stops:
        tail = []
        adjusted.append(f"ends with {hf.convert_ids_to_tokens(last)}")
    tokens = head + ids + tail
    return Example(tokens=tokens, mask=[True] * len(tokens), source=where), adjusted


def _cut_extra(ex: Example, max_len: int) -> dict | None:
    """An image / audio row's extras for its first max_len tokens; an image or a clip is never cut."""
    if not ex.extra:
        return ex.extra
    kinds = ex.extra.get("mm_token_type_ids")
    if kinds is not None and kinds[0, max_len:].any():
        raise InputError(f"is {len(ex.tokens)} tokens and truncating it to data.max_seq_length {max_len} would cut "
                         "an image or audio clip", where=ex.source,
                         hint="raise data.max_seq_length, or use fewer or smaller images / shorter clips")
    return {**ex.extra, **({"mm_token_type_ids": kinds[:, :max_len]} if kinds is not None else {})}


def fit_length(ex: Example, max_len: int, policy: str) -> Example | None:
    """Apply data.overlong to one example: the example, a truncated copy, or None (dropped). A preference
    pair is fitted answer by answer (the shared prompt is cut the same way in both) and dropped whole."""
    if ex.rejected is not None:
        chosen = fit_length(Example(ex.tokens, ex.mask, ex.source), max_len, policy)
        rejected = fit_length(ex.rejected, max_len, policy)
        if chosen is None or rejected is None or not (sum(chosen.mask[1:]) and sum(rejected.mask[1:])):
            return None
        if chosen.tokens == ex.tokens and rejected is ex.rejected:
            return ex
        chosen.rejected = rejected
        return chosen
    if len(ex.tokens) <= max_len:
        return ex
    if policy == "truncate":
        return Example(ex.tokens[:max_len], ex.mask[:max_len], ex.source, _cut_extra(ex, max_len))
    if policy == "drop":
        return None
    raise InputError(f"is {len(ex.tokens)} tokens, longer than data.max_seq_length {max_len}", where=ex.source,
                     hint="raise data.max_seq_length, or set data.overlong to truncate or drop")
