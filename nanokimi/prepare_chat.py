"""`nanokimi prepare chat`: conversations (conversations.py) rendered with Kimi-K2's chat template (chat_template.py)
into a chat dataset. train.bin / val.bin hold the token ids, one conversation after another, as a text dataset does;
beside them train_mask.bin / val_mask.bin hold one byte per token, 1 where the assistant wrote it (its replies, tool
calls and their <|im_end|>: the loss trains on those alone), and train_starts.bin / val_starts.bin where each
conversation starts (training rows start there: data.ChatData). Val is every (1/val_fraction)-th conversation, or
--val_input's."""

from pathlib import Path

import numpy as np

from .chat_template import CHAT_TOKENS, TEMPLATE_VERSION, encode, render
from .corpus import describe, progress_bar
from .errors import UserError
from .prepared import new_dataset, save_dataset_meta, token_dtype
from .tokenizer import CharTokenizer, build_tokenizer, load_tokenizer


class ChatText:
    """The text of each conversation of a corpus (what the template writes between its tokens), for learning a
    tokenizer: a corpus of texts as prepare.build_tokenizer reads one."""

    single_document = False

    def __init__(self, corpus):
        self.corpus, self.files, self.total_bytes = corpus, corpus.files, corpus.total_bytes

    @property
    def bytes_read(self):
        return self.corpus.bytes_read

    def __iter__(self):
        for _, conversation in self.corpus:
            yield (
                True,
                "".join(
                    text for text, special, _ in render(conversation["messages"], conversation["tools"]) if not special
                ),
            )


class ChatSplit:
    """One split as it is written: token ids, their loss mask, and where each conversation starts."""

    def __init__(self, folder, split, dtype):
        self.files = [open(Path(folder) / f"{split}{suffix}.bin", "wb") for suffix in ("", "_mask", "_starts")]
        self.dtype, self.tokens, self.conversations, self.trained = dtype, 0, 0, 0

    def add(self, ids, trains):
        tokens, mask, starts = self.files
        starts.write(np.array([self.tokens], dtype=np.uint64).tobytes())
        tokens.write(np.array(ids, dtype=self.dtype).tobytes())
        mask.write(np.array(trains, dtype=np.uint8).tobytes())
        self.tokens, self.conversations, self.trained = (
            self.tokens + len(ids),
            self.conversations + 1,
            self.trained + sum(trains),
        )

    def close(self):
        for f in self.files:
            f.close()


def chat_tokenizer(kind, corpus, val_corpus, vocab_size, tokenizer_dir, tokenizer_chars, progress):
    """(tokenizer, added): the tokenizer --tokenizer makes, or the one of tokenizer_dir, with the chat tokens;
    `added` counts those a reused tokenizer lacked (appended after its vocabulary)."""
    if tokenizer_dir is None:
        return build_tokenizer(
            kind or "char",
            ChatText(corpus),
            val_corpus and ChatText(val_corpus),
            vocab_size,
            int(tokenizer_chars or 1e9),
            None,
            progress,
            CHAT_TOKENS,
        ), 0
    tokenizer = load_tokenizer(tokenizer_dir)
    if isinstance(tokenizer, CharTokenizer):
        missing = [t for t in CHAT_TOKENS if tokenizer.special_token_id(t) is None]
        return CharTokenizer(tokenizer.chars + missing, tokenizer.boundary_token_id), len(missing)
    return tokenizer, len(tokenizer.with_special_tokens(CHAT_TOKENS))


def prepare_chat(out, corpus, val_corpus, kind, vocab_size, tokenizer_dir, tokenizer_chars, val_fraction, progress):
    """Write the chat dataset of `corpus` (conversations) into `out`; returns its meta.json."""
    tokenizer, added = chat_tokenizer(kind, corpus, val_corpus, vocab_size, tokenizer_dir, tokenizer_chars, progress)
    dtype = token_dtype(tokenizer)
    without_reply, index = 0, -1
    with new_dataset(out) as tmp:
        train, val = ChatSplit(tmp, "train", dtype), ChatSplit(tmp, "val", dtype)
        try:
            for corpus_, is_val in ((corpus, False), (val_corpus, True)):
                if corpus_ is None:
                    continue
                with progress_bar(corpus_, "tokenize val" if is_val else "tokenize", progress) as bar:
                    for _, conversation in corpus_:
                        bar.update(corpus_.bytes_read - bar.n)
                        if not any(m["role"] == "assistant" for m in conversation["messages"]):
                            without_reply += 1  # nothing in it would train
                            continue
                        index += not is_val
                        into = (
                            val
                            if is_val
                            or val_corpus is None
                            and int((index + 1) * val_fraction) != int(index * val_fraction)
                            else train
                        )
                        into.add(*encode(tokenizer, conversation["messages"], conversation["tools"]))
        finally:
            train.close()
            val.close()
        if train.conversations == 0:
            raise UserError(
                f"{describe(corpus)} holds no conversation with an assistant message: nothing would "
                f"train" + (f" ({without_reply} conversations without one skipped)" if without_reply else "")
            )
        if val.conversations == 0:
            raise UserError(
                f"{train.conversations} conversation(s) are too few to hold out every "
                f"{round(1 / val_fraction)}th for validation: pass more, a larger --val_fraction, or "
                f"--val_input"
            )
        meta = save_dataset_meta(
            tmp,
            tokenizer,
            tokenizer_dir if not added else None,
            dtype,
            train_tokens=train.tokens,
            val_tokens=val.tokens,
            train_documents=train.conversations,
            val_documents=val.conversations,
            chat={
                "template": TEMPLATE_VERSION,
                "train_trained_tokens": train.trained,
                "val_trained_tokens": val.trained,
                "skipped_without_reply": without_reply,
            },
        )
    return meta | {"added_chat_tokens": added}
