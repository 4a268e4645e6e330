"""`nanokimi sample`: what it prints for each kind of tokenizer, and its refusals."""

import json

from nanokimi.sample import sample
from tests.conftest import cli_error, train


def test_a_word_level_model_prints_its_words_apart_and_says_why_it_needs_a_prompt(tmp_path, shakespeare_text, capsys):
    """A WordLevel tokenizer decodes words with a space between them: the first sampled word joins the prompt the
    same way (it was glued to it), and a newline, the default prompt, encodes to no token at all."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = shakespeare_text[:20_000].split()
    vocab = {w: i for i, w in enumerate(["[UNK]", "<|endoftext|>", *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "words.json"))
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(words[i : i + 200])}) + "\n" for i in range(0, len(words), 200))
    )
    from nanokimi.cli import main

    main(
        [
            "prepare",
            "text",
            f"--input={tmp_path / 'docs.jsonl'}",
            f"--tokenizer={tmp_path / 'words.json'}",
            f"--out={tmp_path / 'd'}",
        ]
    )
    train(tmp_path / "d", tmp_path / "run", "--max_iters=3")
    capsys.readouterr()
    [text] = sample(tmp_path / "run", "First Citizen:", max_new_tokens=4, temperature=0)
    printed = capsys.readouterr().out
    assert printed.startswith("First Citizen: ") and printed.rstrip("\n") == text
    assert text == " ".join(text.split()) and len(text.split()) == 2 + 4  # words, one space apart
    assert "default prompt, to no token: pass --prompt=TEXT" in cli_error(capsys, "sample", tmp_path / "run")
