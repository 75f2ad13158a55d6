"""The offline demo model: a tiny random-weight Llama with a real BPE tokenizer.

No model hub is reachable from our machines, yet every code path (vLLM, tokenizer, chat template,
tool-call and reasoning parsers) should be the real one; this builds such a model locally in a few
seconds, deterministically.

The vocabulary is a byte-level BPE trained on a little text, plus added tokens:

- ``<s>``, ``</s>``, ``<pad>`` and the role tokens ``<|system|>``, ``<|user|>``, ``<|assistant|>``,
  ``<|tool|>``: special, so ``skip_special_tokens`` hides them from generated text.
- ``<tool_call>``, ``</tool_call>``, ``<think>``, ``</think>``: single tokens but *not* special, as
  in the Qwen and DeepSeek-R1 vocabularies. They stay in the text whatever ``skip_special_tokens``
  says, so every parser that reads them from the text works: vLLM's ``hermes`` tool parser,
  and the ``qwen3`` and ``deepseek_r1`` reasoning parsers (``deepseek_r1`` leaves
  ``skip_special_tokens`` on, and would never see a special ``</think>``).

The chat template (:data:`CHAT_TEMPLATE`) renders a turn as ``<|role|>`` (followed by the message's
``name``, if it has one), a newline, the content, and ``</s>`` plus a newline. It knows Hermes-style
tool calling and Qwen3-style thinking:

- ``tools`` are listed, one JSON object a line between ``<tools>`` and ``</tools>``, at the end of
  the first system turn (one is opened if the conversation has none), with an instruction to answer
  with ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``;
- an assistant message's ``tool_calls`` follow its content, each as
  ``<tool_call>\\n{"name": NAME, "arguments": ARGUMENTS}\\n</tool_call>``;
- role ``tool`` (a tool's result) is a turn of its own, ``<|tool|>``;
- ``enable_thinking=False`` ends the generation prompt with an empty ``<think>\\n\\n</think>\\n\\n``;
  by default the prompt ends at ``<|assistant|>\\n``, and earlier turns' reasoning is not replayed;
- the ``developer`` role is not named, so vLLM maps it to ``system``.

A conversation without tools, tool turns, names or ``enable_thinking=False`` renders exactly as the
first version of the template did (``tests/test_demo_model.py`` holds that version to compare).

vLLM's ``qwen3`` parser ends its backwards search for a reasoning boundary at Qwen's ChatML turn
tokens, which this vocabulary does not have: for it, a prompt holding any ``<tool_call>`` (every
prompt with tools) counts as one whose reasoning has already ended. ``deepseek_r1`` looks only for
``<think>``/``</think>`` and has no such blind spot.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_MODEL_NAME = "switchyard-demo"

# Bump when the recipe changes so that cached copies of an older recipe are rebuilt.
_RECIPE = "switchyard-demo-model v2"
_MARKER = ".switchyard-complete"
_SEED = 1234
_VOCAB_SIZE = 768

_BOS, _EOS, _PAD = "<s>", "</s>", "<pad>"
_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
TOOL_ROLE_TOKEN = "<|tool|>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
THINK_START, THINK_END = "<think>", "</think>"
MARKUP_TOKENS = (TOOL_CALL_START, TOOL_CALL_END, THINK_START, THINK_END)
"""Added tokens that are not special: generated markup that parsers read from the text."""

# Turns end with eos so that a model that learned the format would stop at the end of its turn.
# Content given as OpenAI-style parts keeps only its text parts. The template never spells the
# developer role, so vLLM renders developer messages as system ones.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    # The tool list: closes the first system turn, or is a system turn of its own.
    "{% if tools %}"
    "{% set tool_list %}"
    "{{ '# Tools\n\nThese functions can be called; their signatures follow, one JSON object a line,"
    " between <tools> and </tools>:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nTo call a function, answer with a JSON object that gives its name and its"
    " arguments, between <tool_call> and </tool_call>:\n<tool_call>\n"
    '{"name": <function name>, "arguments": <arguments as a JSON object>}'
    "\n</tool_call>' }}"
    "{% endset %}"
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|system|>\n' + tool_list + eos_token + '\n' }}"
    "{% endif %}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['name'] is string %}{{ message['name'] }}{% endif %}"
    "{{ '\n' }}"
    "{% set text %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endset %}"
    "{{ text }}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}"
    "{% set function = call['function'] if call['function'] is defined else call %}"
    "{% if text or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": ' + (function['name'] | tojson) + ', \"arguments\": ' }}"
    "{% if function['arguments'] is string %}{{ function['arguments'] }}"
    "{% else %}{{ function['arguments'] | tojson }}{% endif %}"
    "{{ '}\n</tool_call>' }}"
    "{% endfor %}"
    "{% endif %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{{ ('\n\n' if text else '') + tool_list }}"
    "{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}"
    "{% endif %}"
    "{% endif %}"
)

_CORPUS = """\
Switchyard is a small serving system for language models. A gateway accepts requests over HTTP,
checks them, and places each one on a stream. Workers read the stream, run the model, and send the
tokens back as soon as they are made, so that a client sees the answer grow word by word.

The weather was calm in the morning. The sun rose over the hills, and the river ran slowly past the
old mill. Children walked to school along the road, talking about games, books, and the long summer
that was still to come. A dog followed them as far as the bridge and then turned back home.

How are you today? I am fine, thank you. What would you like to know? Please tell me about the
history of the railway. The first trains carried coal from the mines to the harbour; later they
carried people, letters, and news from one town to the next, and the whole country felt smaller.

A good answer is short, clear, and true. If you do not know something, say so. Numbers such as
1, 2, 3, 10, 42, 100 and 2048 appear in questions about time, money, distance and memory. The
system, the user, and the assistant each take turns in a conversation, and every turn has an end.
"""


def default_dir() -> Path:
    """Where the demo model is cached: ``$XDG_CACHE_HOME/switchyard/demo-model``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "switchyard" / "demo-model"


DEFAULT_DIR: Path = default_dir()


def _is_complete(directory: Path) -> bool:
    marker = directory / _MARKER
    return marker.is_file() and marker.read_text().strip() == _RECIPE


def _write_model(out: Path) -> None:
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    specials = [_BOS, _EOS, _PAD, *_ROLE_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # The full byte alphabet keeps every input encodable, whatever the training text.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    # Added after training, so the trained vocabulary and its ids stay those of the first recipe.
    bpe.add_special_tokens([TOOL_ROLE_TOKEN])
    bpe.add_tokens([AddedToken(token, special=False, normalized=False) for token in MARKUP_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=_BOS, eos_token=_EOS, pad_token=_PAD, model_max_length=2048
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        # head_dim 64: vLLM's CPU attention rejects smaller heads (16 fails).
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    # fork_rng: seed the weights without changing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        model = LlamaForCausalLM(config).float()
    # The shard-writing progress bar is noise in worker logs for a 2 MB file.
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()


def build_demo_model(directory: Path) -> Path:
    """Build the demo model into ``directory`` (replacing it) and return it.

    The model is written to a temporary sibling and renamed into place, so an interrupted build
    never leaves a half model behind under the final name.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared
    try:
        _write_model(tmp)
        (tmp / _MARKER).write_text(_RECIPE + "\n")  # last: its presence means "complete"
        # Move any old copy aside first: two renames keep the window without a model tiny.
        old = tmp.with_name(tmp.name + ".old")
        if directory.exists():
            directory.rename(old)
        try:
            tmp.rename(directory)
        except OSError:
            # A concurrent builder won the race; its model is as good as ours.
            if not _is_complete(directory):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.with_name(tmp.name + ".old"), ignore_errors=True)
    return directory


def ensure_demo_model(directory: Path | None = None) -> Path:
    """Return ``directory`` (default :func:`default_dir`), building the model only if missing."""
    directory = Path(directory) if directory is not None else default_dir()
    if not _is_complete(directory):
        build_demo_model(directory)
    return directory
