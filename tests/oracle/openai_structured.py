"""Drives a running graft-server with the official `openai` Python client through structured
output, tool calls and the sampling options: 20 JSON schemas whose answers pydantic validates
(the client's own `parse`), a tool-call round trip plain and streamed, n=4, logit_bias, several
prompts, and unknown fields refused. The model has random weights, so what it says is nonsense;
what is checked is that the answers keep the shapes asked for. Exits non-zero at the first
expectation that fails.

    $GRAFT_ORACLE_PYTHON tests/oracle/openai_structured.py --url http://127.0.0.1:8000 \
        --model made --tokenizer engine/tests/data/tiny/made/tokenizer.json
"""

import argparse
import enum
import json
import re
import sys
from typing import Annotated, Literal, Optional

import openai
from pydantic import BaseModel, Field
from tokenizers import Tokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--url", required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--tokenizer", required=True, help="the model's tokenizer.json")
args = parser.parse_args()

client = openai.OpenAI(base_url=args.url + "/v1", api_key="not-needed", max_retries=0)
MODEL = args.model


def check(condition, what):
    if not condition:
        print(f"FAILED: {what}")
        sys.exit(1)
    print(f"ok: {what}")


# Twenty schemas, as users write them: pydantic models the client turns into strict JSON
# schemas. Strings and lists are bounded, since an untrained model may never close them.
Short = Field(max_length=8)
Word = Annotated[str, Field(max_length=6)]


class Colour(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Flag(BaseModel):
    ok: bool


class Count(BaseModel):
    count: int = Field(ge=0, le=99)


class Name(BaseModel):
    name: str = Short


class Pick(BaseModel):
    colour: Colour


class Mode(BaseModel):
    mode: Literal["fast", "slow", "auto"]


class Point(BaseModel):
    x: int = Field(ge=-9, le=9)
    y: int = Field(ge=-9, le=9)


class Person(BaseModel):
    name: str = Short
    age: int = Field(ge=0, le=120)


class Tags(BaseModel):
    tags: list[Word] = Field(max_length=3)


class Scores(BaseModel):
    scores: list[int] = Field(max_length=4)


class Maybe(BaseModel):
    note: Optional[str] = Field(max_length=6)


class Nested(BaseModel):
    person: Person
    active: bool


class Line(BaseModel):
    start: Point
    end: Point


class Team(BaseModel):
    members: list[Name] = Field(max_length=2)


class Code(BaseModel):
    code: str = Field(pattern=r"^[A-Z]{3}-[0-9]{2}$")


class Either(BaseModel):
    value: int | bool


class Choice(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int = Field(ge=1, le=5)


class Palette(BaseModel):
    colours: list[Colour] = Field(min_length=1, max_length=3)


class Event(BaseModel):
    kind: Literal["click", "view"]
    at: int = Field(ge=0, le=9999)
    where: Optional[Point]


class Order(BaseModel):
    id: int = Field(ge=1, le=999)
    items: list[Name] = Field(max_length=2)
    paid: bool
    colour: Colour


class Label(BaseModel):
    label: Colour
    weight: int = Field(ge=0, le=9)
    hidden: bool


SCHEMAS = [Flag, Count, Name, Pick, Mode, Point, Person, Tags, Scores, Maybe, Nested, Line, Team,
           Code, Either, Choice, Palette, Event, Order, Label]
check(len({s.__name__ for s in SCHEMAS}) == 20, "twenty different schemas")

for i, schema in enumerate(SCHEMAS):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": f"Describe item {i} as JSON."}],
        response_format=schema,
        max_tokens=200,
        temperature=0.7,
        seed=i,
    )
    message = completion.choices[0].message
    check(isinstance(message.parsed, schema), f"{schema.__name__}: {message.content}")
    # pydantic validated it; the raw text is also plain JSON of that object.
    check(json.loads(message.content) == message.parsed.model_dump(mode="json"),
          f"{schema.__name__}: the text is the object")

# json_object bounds nothing, so an untrained model may write one key forever; a client's
# logit_bias towards `"` and `}` makes it close them whenever the grammar allows.
vocabulary = Tokenizer.from_file(args.tokenizer)
closers = {str(vocabulary.token_to_id(c)): 20 for c in ['"', "}"]}
any_object = client.chat.completions.create(
    model=MODEL, messages=[{"role": "user", "content": "JSON please"}], max_tokens=100,
    temperature=0, response_format={"type": "json_object"}, logit_bias=closers,
)
text = any_object.choices[0].message.content
check(any_object.choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict),
      f"json_object: {text!r}")

regex = client.completions.create(
    model=MODEL, prompt="A licence plate:", max_tokens=20, temperature=1.0, seed=3,
    extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-[0-9]{3}"}},
)
check(re.fullmatch(r"[A-Z]{2}-[0-9]{3}", regex.choices[0].text), f"regex: {regex.choices[0].text!r}")
choice = client.chat.completions.create(
    # Room for the longest choice in the tiny vocabulary's tokens: sampled (no seed), a
    # shorter limit cut "straight on" short now and then.
    model=MODEL, messages=[{"role": "user", "content": "Pick one"}], max_tokens=40,
    extra_body={"guided_choice": ["left", "right", "straight on"]},
)
check(choice.choices[0].message.content in ["left", "right", "straight on"], "guided_choice")

# A tool-call round trip: the model must call (tool_choice names the function), the client
# runs the tool and sends the result back, the model answers.
tools = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city for some days.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        }, "required": ["city", "days"], "additionalProperties": False},
    }},
    {"type": "function", "function": {
        "name": "get_time", "description": "The time in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        }, "required": ["city"], "additionalProperties": False},
    }},
]
question = [{"role": "user", "content": "What is the weather in Oslo?"}]
named = {"type": "function", "function": {"name": "get_weather"}}

plain = client.chat.completions.create(
    model=MODEL, messages=question, tools=tools, tool_choice=named, max_tokens=100, temperature=0,
)
calls = plain.choices[0].message.tool_calls
check(plain.choices[0].finish_reason == "tool_calls" and len(calls) == 1, "a forced call")
call = calls[0]
arguments = json.loads(call.function.arguments)
check(call.type == "function" and call.function.name == "get_weather" and call.id,
      f"the call names get_weather: {call}")
check(arguments["city"] in ["Paris", "Oslo", "Lima"] and 1 <= arguments["days"] <= 7,
      f"its arguments follow the schema: {arguments}")

streamed = list(client.chat.completions.create(
    model=MODEL, messages=question, tools=tools, tool_choice=named, max_tokens=100, temperature=0,
    stream=True,
))
pieces = [d for c in streamed if c.choices for d in (c.choices[0].delta.tool_calls or [])]
check(bool(pieces) and bool(pieces[0].id) and pieces[0].type == "function",
      "the first tool-call delta carries an id")
check(pieces[0].function.name == "get_weather" and all(p.index == 0 for p in pieces),
      "streamed deltas name the function and index the call")
check(all(p.function.name is None for p in pieces[1:]), "the name comes once")
check("".join(p.function.arguments or "" for p in pieces) == call.function.arguments,
      "the streamed arguments add up to the plain ones")
check([c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason]
      == ["tool_calls"], "the stream finishes with tool_calls")

conversation = question + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}},
    ]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "snow", "high": -3})},
]
answer = client.chat.completions.create(
    model=MODEL, messages=conversation, tools=tools, tool_choice="none", max_tokens=12, temperature=0,
)
check(isinstance(answer.choices[0].message.content, str) and not answer.choices[0].message.tool_calls,
      "the model answers after the tool's result")
answer_streamed = "".join(
    c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=conversation, tools=tools, tool_choice="none", max_tokens=12,
        temperature=0, stream=True,
    ) if c.choices
)
check(answer_streamed == answer.choices[0].message.content, "and the same answer streamed")
prompt_with_result = client.chat.completions.create(
    model=MODEL, messages=conversation[:2] + [{"role": "tool", "tool_call_id": call.id, "content": "rain"}],
    max_tokens=1, temperature=0,
)
check(prompt_with_result.usage.prompt_tokens != answer.usage.prompt_tokens,
      "the tool's result is in the prompt")

required = client.chat.completions.create(
    model=MODEL, messages=question, tools=tools, tool_choice="required", parallel_tool_calls=False,
    max_tokens=100, temperature=0.8, seed=4,
)
names = [c.function.name for c in required.choices[0].message.tool_calls or []]
check(len(names) == 1 and names[0] in ["get_weather", "get_time"], f"tool_choice required calls a tool: {names}")

# n, logit_bias, several prompts.
four = client.completions.create(
    model=MODEL, prompt="colour", max_tokens=8, n=4, temperature=1.0, seed=7,
    extra_body={"ignore_eos": True},
)
check(sorted(c.index for c in four.choices) == [0, 1, 2, 3], "n=4 gives four choices")
check(len({c.text for c in four.choices}) > 1, "which differ")
check(four.usage.completion_tokens == 32 and all(c.finish_reason == "length" for c in four.choices),
      "usage counts every choice's tokens")
chat_four = list(client.chat.completions.create(
    model=MODEL, messages=question, max_tokens=4, n=4, temperature=1.0, seed=2, stream=True,
))
check({c.choices[0].index for c in chat_four if c.choices} == {0, 1, 2, 3}, "n=4 streamed")

greedy = client.completions.create(
    model=MODEL, prompt="colour red", max_tokens=6, temperature=0, logprobs=1,
    extra_body={"return_tokens_as_token_ids": True},
)
tokens = greedy.choices[0].logprobs.tokens
first = tokens[0].removeprefix("token_id:")
biased = client.completions.create(
    model=MODEL, prompt="colour red", max_tokens=6, temperature=0, logprobs=1,
    logit_bias={first: -100}, extra_body={"return_tokens_as_token_ids": True},
)
check(f"token_id:{first}" not in biased.choices[0].logprobs.tokens,
      f"logit_bias -100 forbids token {first}: {tokens} then {biased.choices[0].logprobs.tokens}")

several = client.completions.create(model=MODEL, prompt=["colour red", "colour blue"], max_tokens=4, temperature=0)
alone = client.completions.create(model=MODEL, prompt="colour blue", max_tokens=4, temperature=0)
check([c.index for c in several.choices] == [0, 1] and several.choices[1].text == alone.choices[0].text,
      "several prompts, each answered as alone")

try:
    client.chat.completions.create(model=MODEL, messages=question, extra_body={"frobnicate": 1})
    check(False, "an unknown field is refused")
except openai.BadRequestError as e:
    check(e.param == "frobnicate" and "frobnicate" in e.message, "an unknown field is a 400 naming it")
try:
    client.completions.create(model=MODEL, prompt="x", suffix="y")
    check(False, "suffix is refused")
except openai.BadRequestError as e:
    check(e.param == "suffix", "suffix is a 400 naming it")
try:
    client.chat.completions.create(
        model=MODEL, messages=question,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
    )
    check(False, "a bad schema is refused")
except openai.BadRequestError as e:
    check(e.param == "response_format", "a bad schema is a 400 naming response_format")
print("openai structured output, tools and sampling: all checks passed")
