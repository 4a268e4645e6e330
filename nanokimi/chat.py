"""Talking to a chat model (`nanokimi chat`): a conversation kept as the token ids the model has read, so that each
turn feeds only its new tokens on top of the MLA latent cache and the KDA state of the turns before (the engine's row
keeps them: nothing is prefilled twice), the model's replies kept as the very ids it sampled, and its tool calls run
(the calculator) and answered before it goes on."""

import sys
from pathlib import Path

import torch

from . import calculator
from .chat_template import CALLS_BEGIN, IM_END, chat_token_ids, check_conversation, encode, parse_reply
from .checkpoint import resolve
from .errors import UserError
from .engine import Engine, Request
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
        self.generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)  # one per conversation
        self.max_new_tokens = max_new_tokens
        self.out, self.log = out or sys.stdout, log or sys.stderr
        self.context = model.context_length
        self.engine = Engine(model, slots=1, use_cache=use_cache)
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.ids = []  # every token of the conversation so far, in order (but the `dropped` first ones)
        self.dropped = 0  # tokens dropped from the front when the conversation outgrew the context
        self.sampled = []  # (start, end) of each reply's tokens that the model sampled, counted with `dropped`
        self.engine.rows[0] = []  # nothing read yet
        self.rendered = 0  # messages whose tokens are in self.ids

    @property
    def cached(self):
        """How many tokens of the conversation the cache holds (positions 0 .. cached - 1)."""
        return len(self.engine.rows[0]) if self.engine.cache is not None else 0

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
        start, text_of = self.dropped + len(self.ids), self.tokenizer.stream(self.ids)
        shown, warned = True, False

        def show(token):
            nonlocal shown, warned
            if request.dropped and not warned:
                warned = True
                self.log.write(
                    f"[the conversation outgrew the model's {self.context}-token context: it keeps its last "
                    f"{self.context // 2} tokens]\n"
                )
            shown = shown and token not in (self.special[CALLS_BEGIN], self.special[IM_END])  # calls: to the log
            if shown:
                self.out.write(text_of(token))
                self.out.flush()

        request = Request(
            self.ids,
            self.max_new_tokens,
            stop_ids=[self.special[IM_END]],
            on_token=show,
            generator=self.generator,
            **self.sampling,
        )
        try:
            tokens = self.engine.run(request)
        except KeyboardInterrupt:  # Ctrl-C ends the reply, not the conversation
            self.engine.abort()  # a forward cut short may have left the cache half-written: read it all again
            tokens = [t for t in request.tokens if t != self.special[IM_END]]
            self.log.write(" [stopped]")
        sampled = tokens[:-1] if tokens[-1:] == [self.special[IM_END]] else tokens
        self.dropped += request.dropped
        self.ids = (self.ids + sampled + [self.special[IM_END]])[request.dropped :]  # the turn ends as every turn
        self.sampled.append((start, start + len(tokens)))
        message = parse_reply(self.tokenizer.decode(sampled))
        self.messages.append(message)
        self.rendered = len(self.messages)  # its tokens are the ones sampled, already in self.ids
        return message


def encode_chat(path, messages, tools=None, add_generation_prompt=False):
    """The token ids of a conversation in the chat template of the model or dataset at `path` (a run, checkpoint or
    prepared chat dataset), as transformers' `apply_chat_template(messages, tools=..., tokenize=True)` gives them."""
    folder = Path(path) if (Path(path) / "meta.json").is_file() else resolve(path)
    return encode(
        load_tokenizer(folder), check_conversation(messages, "messages", tools), tools, add_generation_prompt
    )[0]
