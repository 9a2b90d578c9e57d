"""``bptt generate``: text sampled from a language-model checkpoint."""

from __future__ import annotations

from bptt.commands.command import Command, CommandParser

PARSER = CommandParser(
    "bptt generate",
    "Sample text from a language-model checkpoint, state carried token to token; prints the prompt and its "
    "continuation.",
    examples="  bptt generate runs/lm/quickstart/checkpoints/best.ckpt --prompt 'ROMEO:' --num-tokens 300\n"
             "  bptt generate best.ckpt --temperature 0 --seed 1",
)
PARSER.add_argument("checkpoint", metavar="CHECKPOINT", help="a language model's .ckpt")
PARSER.add_argument("--prompt", default="\n", help="text to continue (default: a new line)")
PARSER.add_argument("--num-tokens", type=int, default=500, help="tokens to sample (default 500)")
PARSER.add_argument("--temperature", type=float, default=0.8,
                    help="softmax temperature; 0 takes the most likely (default 0.8)")
PARSER.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")


def run(args: list[str], trusted: bool) -> int:
    opts = PARSER.parse_args(args)
    from bptt.inference.generate import generate

    print(generate(opts.checkpoint, prompt=opts.prompt, num_tokens=opts.num_tokens, temperature=opts.temperature,
                   seed=opts.seed, trusted=trusted))
    return 0


COMMAND = Command("sample text from a language-model checkpoint", run)
