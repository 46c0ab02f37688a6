"""The HTTP contract without a server: every input class the parser or the tokenizer cannot
take is a 4xx naming it, and the published schema says exactly what the server enforces."""

from __future__ import annotations

import jsonschema
import pytest

from tether.serving.contract import RequestError, inline_schema, parse_json, validate_body
from tether.tasks.classification_serving import text_request_model
from tether.tasks.token_serving import entity_request_model

CASES = {
    b'{"texts": [': "malformed JSON",
    b"": "empty body",
    b'{"text": "caf\xe9"}': "not valid UTF-8",
    b'{"texts": ' + b"[" * 3000 + b"]" * 3000 + b"}": "nested deeper",
    b'{"a": [[[[[[1]]]]]]}': "nested deeper than 4",
    b'{"texts": ["\\ud83d"]}': "texts[0]: holds an unpaired surrogate (\\ud83d)",
    b'{"\\udc00x": 1}': "unpaired surrogate",
    b'{"text": NaN}': "NaN is not JSON",
    b'{"text": -Infinity}': "-Infinity is not JSON",
    b'{"text": 1e400}': "too large to represent",
    b'{"text": ' + b"1" * 5000 + b"}": "unrepresentable JSON",
    b'{"text": "a", "text": "b"}': "duplicate key 'text'",
}


@pytest.mark.parametrize("body", list(CASES), ids=[f"case{i}" for i in range(len(CASES))])
def test_unparseable_or_unrepresentable_bodies_are_400(body):
    with pytest.raises(RequestError) as err:
        parse_json(body, max_depth=4)
    assert err.value.status == 400
    assert CASES[body] in err.value.message


def test_a_paired_surrogate_escape_is_fine():
    """An escaped emoji (a surrogate *pair*) is valid Unicode and passes."""
    assert parse_json(b'{"text": "\\ud83d\\ude00"}', 4) == {"text": "\U0001f600"}


@pytest.mark.parametrize("model", [text_request_model(3, 10), entity_request_model(3, 10)])
def test_published_schema_agrees_with_the_validator(model):
    """Bodies the schema accepts, the server accepts; bodies it rejects get a 422."""
    schema = inline_schema(model)
    bodies = [
        {"text": "a"},
        {"texts": ["a", "b"]},
        {"text": "a", "texts": ["b"]},
        {},
        {"texts": []},
        {"texts": ["a"] * 4},
        {"text": " "},
        {"text": "x" * 11},
        {"text": "a", "extra": 1},
        {"tokens": [["a", "b"]]},
        {"tokens": [[]]},
    ]
    for body in bodies:
        schema_ok = jsonschema.Draft202012Validator(schema).is_valid(body)
        try:
            validate_body(body, model)
            server_ok = True
        except RequestError as e:
            assert e.status == 422
            server_ok = False
        assert schema_ok == server_ok, body


def test_an_invalid_body_of_several_shapes_names_the_field_of_the_shape_it_sent():
    """The 422's field is where the sent shape is wrong ('items[0].context'), not the first
    union branch's title ('Question.question')."""
    from tether.serving.contract import RequestError, validate_body
    from tether.tasks.question_answering import QuestionAnswering

    model = QuestionAnswering().request_model(8, 1000)
    for body, field in (
        ({"items": [{"question": "Where?"}]}, "items[0].context"),
        ({"question": "Where?"}, "context"),
        ({"text": "no such shape"}, None),
    ):
        with pytest.raises(RequestError) as refused:
            validate_body(body, model)
        assert refused.value.status == 422 and refused.value.param == field, body
