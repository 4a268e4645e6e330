"""Talking to a chat model (`nanokimi chat`): a conversation kept as the token ids the model has read, so that each
turn feeds only its new tokens on top of the MLA latent cache and the KDA state of the turns before (nothing is
prefilled twice), the model's replies kept as the very ids it sampled, and its tool calls run (the calculator) and
answered before it goes on."""

import sys
from pathlib import Path

import torch

from . import calculator
from .chat_template import CALLS_BEGIN, IM_END, chat_token_ids, check_conversation, encode, parse_reply
from .checkpoint import resolve
from .errors import UserError
from .generation import sample_next
from .tokenizer import load_tokenizer

TOOLS = {calculator.NAME: calculator}
MAX_TOOL_ROUNDS = 4  # tool calls answered in a row before the reply is ended


class Chat:
    """One conversation with `model`: `say(text)` adds a user turn and returns the assistant's reply (an OpenAI
    message; text streamed to `out` as it is sampled, tool calls and notes to `log`). `reset()` starts over."""

    def __init__(
        self,
        model,
        tokenizer,
        system=None,
        tools=(),
        temperature=0.6,
        top_k=None,
        top_p=None,
        seed=1337,
        max_new_tokens=512,
        use_cache=True,
        out=None,
        log=None,
    ):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.special = chat_token_ids(tokenizer)  # a base model's tokenizer: one line saying so
        self.tools = [TOOLS[name] for name in tools]
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
        self.max_new_tokens, self.use_cache = max_new_tokens, use_cache and model.has_kv_cache
        self.out, self.log = out or sys.stdout, log or sys.stderr
        self.context = model.context_length
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.ids = []  # every token of the conversation so far, in order (but the `dropped` first ones)
        self.dropped = 0  # tokens dropped from the front when the conversation outgrew the context
        self.sampled = []  # (start, end) of each reply's tokens that the model sampled, counted with `dropped`
        self.cached = 0  # how many of them the cache holds (positions 0 .. cached - 1)
        self.cache = self.model.make_cache(1, self.context) if self.use_cache else None
        self.rendered = 0  # messages whose tokens are in self.ids

    @property
    def tool_definitions(self):
        return [tool.DEFINITION for tool in self.tools] or None

    def say(self, text):
        """Add the user's turn and generate the reply, running its tool calls; returns the last assistant message."""
        self.messages.append({"role": "user", "content": text})
        for _ in range(MAX_TOOL_ROUNDS + 1):
            message = self.reply()
            if not message.get("tool_calls") or not self.tools:
                break
            for call in message["tool_calls"]:
                tool = TOOLS.get(call["function"]["name"])
                result = (
                    tool.call(call["function"]["arguments"])
                    if tool in self.tools
                    else f"error: no tool named {call['function']['name']!r}"
                )
                self.log.write(f"[{call['function']['name']}({call['function']['arguments']}) -> {result}]\n")
                self.messages.append(
                    {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"], "content": result}
                )
        self.out.write("\n")  # one line per reply: the text of its turns (a tool call's turn usually has none)
        self.out.flush()
        return message

    def reply(self):
        """Sample the assistant's turn after the messages so far; streams its text, returns it parsed."""
        try:
            new, _ = encode(
                self.tokenizer, self.messages, self.tool_definitions, add_generation_prompt=True, first=self.rendered
            )
        except UserError as e:  # a char vocabulary lacks a character of the turn
            self.messages.pop()  # the turn is not said
            raise UserError(
                f"{e} (the system prompt, tool definitions and messages must be written in them: pass "
                f"--system with a prompt like the data's)"
            ) from None
        self.ids += new
        start, sampled, shown, drawn = self.dropped + len(self.ids), [], True, 0
        text_of = self.tokenizer.stream(self.ids)
        try:
            for _ in range(self.max_new_tokens):
                token = self.next_token()
                self.ids.append(token)
                drawn += 1
                if token == self.special[IM_END]:
                    break
                sampled.append(token)
                shown = shown and token != self.special[CALLS_BEGIN]  # the calls go to the log, parsed
                piece = text_of(token)
                if shown:
                    self.out.write(piece)
                    self.out.flush()
            else:  # out of tokens: the turn still ends as every turn does
                self.ids.append(self.special[IM_END])

        except KeyboardInterrupt:  # Ctrl-C ends the reply, not the conversation
            self.ids = self.ids[: start - self.dropped + len(sampled)] + [self.special[IM_END]]
            drawn = len(sampled)
            self.cached = 0  # a forward cut short may have left the cache half-written: read it all again
            self.log.write(" [stopped]")
        self.sampled.append((start, start + drawn))
        message = parse_reply(self.tokenizer.decode(sampled))
        self.messages.append(message)
        self.rendered = len(self.messages)  # its tokens are the ones sampled, already in self.ids
        return message

    @torch.no_grad()
    def next_token(self):
        """Feed the tokens the model has not read yet; sample the next one."""
        if len(self.ids) >= self.context:  # the window is full: keep its newest half, read again from position 0
            self.log.write(
                f"[the conversation outgrew the model's {self.context}-token context: it keeps its last "
                f"{self.context // 2} tokens]\n"
            )
            self.dropped += len(self.ids) - self.context // 2
            self.ids, self.cached = self.ids[-(self.context // 2) :], 0
        device = self.model.lm_head.weight.device
        if self.use_cache:
            new = torch.tensor([self.ids[self.cached :]], device=device)
            logits, _ = self.model(new, cache=self.cache, start_pos=self.cached)
            self.cached = len(self.ids)
        else:
            logits, _ = self.model(torch.tensor([self.ids], device=device))
        return int(sample_next(logits[:, -1], generator=self.generator, **self.sampling))


def encode_chat(path, messages, tools=None, add_generation_prompt=False):
    """The token ids of a conversation in the chat template of the model or dataset at `path` (a run, checkpoint or
    prepared chat dataset), as transformers' `apply_chat_template(messages, tools=..., tokenize=True)` gives them."""
    folder = Path(path) if (Path(path) / "meta.json").is_file() else resolve(path)
    return encode(
        load_tokenizer(folder), check_conversation(messages, "messages", tools), tools, add_generation_prompt
    )[0]
