"""Make the tiny Llama model the real-vLLM tier serves: nothing can be downloaded here.

Runs in the vLLM environment (it needs torch, tokenizers and transformers):

    python tests/vllm/tiny_model.py OUT_DIR

A byte-level BPE tokenizer trained on a seeded synthetic corpus, saved with a chat template, and a
randomly initialised ``LlamaForCausalLM`` (2 layers, hidden size 128, 2 heads of 64) in bfloat16.
Its text is gibberish; its tokens, usage and metrics are real, which is all the tier checks. The
same seed gives the same files, so a cached model is reused only when this script has not changed.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 20261129
VOCAB_SIZE = 2048
MAX_POSITIONS = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]

# One turn per message, then the assistant's header when a reply is wanted: the shape every
# chat template has, in a few lines.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_WORD_TEXT = (
    "the of and to in is that it for on was with as be by at this from or have an they which "
    "one you were her all she there would their we him been has when who will more no if out so "
    "said what up its about into than them can only other new some could time these two may then "
    "do first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since "
    "against go came right used take three gateway token worker tenant request stream model cache "
    "route budget quota ledger usage metric latency batch prefix prompt completion"
)
WORDS = _WORD_TEXT.split()


def corpus(lines: int) -> list[str]:
    rng = random.Random(SEED)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 24))]
        number = str(rng.randint(0, 10_000)) if rng.random() < 0.3 else ""
        out.append(" ".join(words).capitalize() + (f" {number}" if number else "") + ".")
    return out


def make_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(20_000), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_model(out: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,  # vLLM's CPU attention rejects 16; 64 is supported
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        dtype=torch.bfloat16,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: tiny_model.py OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    make_model(out, make_tokenizer(out))
    print(out)


if __name__ == "__main__":
    main()
