"""Bounded work (docs/SECURITY.md): every string and repeated field of every request has a
byte or count bound checked in convert before anything is copied; each method's byte limit
fits the largest request its field bounds allow; the request guard never raises; error
messages echo at most ~200 characters of what a client sent."""

from __future__ import annotations

import grpc
import pytest

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer_server import convert
from featuresteer_server.config import load_config
from featuresteer_server.errors import (
    InvalidArgument,
    NotFound,
    bounded_message,
    pinned_dictionary,
    shown,
)
from featuresteer_server.interceptors import _Refused, guarded_deserializer

pytestmark = pytest.mark.unit
LIMITS = load_config().limits()
L = LIMITS
REF = pb.FeatureRef(dictionary_id="d@v1", index=1)
LONG_ID = "x" * (L.max_id_bytes + 1)


def _iv(**kw) -> pb.Intervention:  # type: ignore[no-untyped-def]
    return pb.Intervention(op=pb.Intervention.OP_ADD, value=1.0, **kw)


def _vec(n: int) -> pb.VectorTarget:
    return pb.VectorTarget(hook_name="blocks.0.hook_resid_post", values=[0.5] * n)


DECODE_CASES = [
    (
        pb.DecodeFeaturesRequest(
            inputs=[pb.DecodeInput(text="a" * (L.max_text_bytes + 1))], top_k=1
        ),
        "text",
    ),
    (  # multi-byte characters: within the character count, over the byte bound
        pb.DecodeFeaturesRequest(
            inputs=[pb.DecodeInput(text="é" * (L.max_text_bytes // 2 + 1))], top_k=1
        ),
        r"inputs\[0\]\.text",
    ),
    (
        pb.DecodeFeaturesRequest(
            inputs=[pb.DecodeInput(token_ids=[1] * (L.max_tokens_per_input + 1))], top_k=1
        ),
        r"inputs\[0\]\.token_ids",
    ),
    (
        pb.DecodeFeaturesRequest(
            inputs=[pb.DecodeInput(text="a")],
            top_k=1,
            features=[REF] * (L.max_features_per_call + 1),
        ),
        "features",
    ),
    (
        pb.DecodeFeaturesRequest(
            inputs=[pb.DecodeInput(text="a")], top_k=1, dictionary_ids=[LONG_ID]
        ),
        r"dictionary_ids\[0\]",
    ),
    (
        pb.DecodeFeaturesRequest(
            inputs=[pb.DecodeInput(text="a")],
            features=[pb.FeatureRef(dictionary_id=LONG_ID, index=1)],
        ),
        r"features\[0\]\.dictionary_id",
    ),
    (
        pb.DecodeFeaturesRequest(
            inputs=[pb.DecodeInput(text="a")],
            features=[pb.FeatureRef(dictionary_id="d", index=1, fingerprint=LONG_ID)],
        ),
        r"features\[0\]\.fingerprint",
    ),
]

GENERATE_CASES = [
    (pb.GenerateRequest(prompt="a" * (L.max_text_bytes + 1)), "prompt"),
    (
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="a")] * (L.max_messages + 1)
        ),
        "messages",
    ),
    (
        pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="a" * (L.max_text_bytes // 2))] * 3
        ),
        "messages",
    ),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role=LONG_ID, content="a")]), r"role"),
    (pb.GenerateRequest(prompt="a", stop=["x"] * (L.max_stop_strings + 1)), "stop"),
    (pb.GenerateRequest(prompt="a", stop=["x" * (L.max_stop_bytes + 1)]), r"stop\[0\]"),
    (pb.GenerateRequest(prompt="a", interventions=[_iv(feature=REF)] * 33), "interventions"),
    (
        pb.GenerateRequest(prompt="a", interventions=[_iv(vector=_vec(L.max_vector_values + 1))]),
        r"interventions\[0\]\.vector\.values",
    ),
    (
        pb.GenerateRequest(
            prompt="a",
            interventions=[_iv(vector=pb.VectorTarget(hook_name=LONG_ID, values=[1.0]))],
        ),
        r"interventions\[0\]\.vector\.hook_name",
    ),
    (
        pb.GenerateRequest(
            prompt="a",
            interventions=[
                _iv(feature=REF, positions=[0] * (L.max_tokens_per_input + L.max_new_tokens + 1))
            ],
        ),
        r"interventions\[0\]\.positions",
    ),
    (  # a position no input can reach
        pb.GenerateRequest(
            prompt="a",
            interventions=[_iv(feature=REF, positions=[L.max_tokens_per_input + L.max_new_tokens])],
        ),
        r"interventions\[0\]\.positions",
    ),
    (
        pb.GenerateRequest(prompt="a", trace=pb.TraceSpec(dictionary_id="d", features=[REF] * 257)),
        "trace.features",
    ),
    (pb.GenerateRequest(prompt="a", trace=pb.TraceSpec(dictionary_id=LONG_ID)), "trace"),
    (pb.GenerateRequest(prompt="a", preset=LONG_ID), "preset"),
    # vLLM's SamplingParams range (a temperature above 2 was INTERNAL on the vLLM engine)
    (pb.GenerateRequest(prompt="a", temperature=2.5), "temperature"),
    (pb.GenerateRequest(prompt="a", temperature=float("inf")), "temperature"),
    (pb.GenerateRequest(prompt="a", temperature=-0.1), "temperature"),
    (pb.GenerateRequest(prompt="a", top_p=1.5), "top_p"),
    (pb.GenerateRequest(prompt="a", top_p=float("nan")), "top_p"),
    (pb.GenerateRequest(prompt="a", repetition_penalty=-1.0), "repetition_penalty"),
    (pb.GenerateRequest(prompt="a", repetition_penalty=float("inf")), "repetition_penalty"),
]

OTHER_CASES = [
    (
        convert.tokenize_request_from_pb,
        pb.TokenizeRequest(text="a" * (L.max_text_bytes + 1)),
        "text",
    ),
    (
        convert.search_request_from_pb,
        pb.SearchFeaturesRequest(query=" " * 600 + "a" * 600),
        "query",
    ),
    (
        convert.search_request_from_pb,
        pb.SearchFeaturesRequest(query="a", dictionary_id=LONG_ID),
        "dictionary_id",
    ),
    (
        convert.get_feature_request_from_pb,
        pb.GetFeatureRequest(feature=pb.FeatureRef(dictionary_id=LONG_ID)),
        "feature.dictionary_id",
    ),
    (convert.job_id_from_pb, pb.GetAttributionRequest(job_id=LONG_ID), "job_id"),
]


@pytest.mark.parametrize(("request_", "field"), DECODE_CASES)
def test_decode_bounds(request_: pb.DecodeFeaturesRequest, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        convert.decode_request_from_pb(request_, LIMITS)


@pytest.mark.parametrize(("request_", "field"), GENERATE_CASES)
def test_generate_bounds(request_: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidArgument, match=field):
        convert.generate_request_from_pb(request_, LIMITS)


@pytest.mark.parametrize(("fn", "request_", "field"), OTHER_CASES)
def test_other_bounds(fn, request_, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match=field):
        fn(request_, LIMITS)


def test_attribute_bounds() -> None:
    n = convert.attribute_prompt_bytes(LIMITS)
    assert n == min(L.max_text_bytes, convert.MAX_TOKEN_BYTES * L.max_attribution_tokens)
    cases = [
        (pb.AttributeRequest(prompt="a" * (n + 1)), "prompt"),
        (pb.AttributeRequest(prompt="a", target_token_ids=[1] * 65), "target_token_ids"),
        (pb.AttributeRequest(prompt="a", dictionary_id=LONG_ID), "dictionary_id"),
    ]
    for request_, field in cases:
        with pytest.raises(InvalidArgument, match=field):
            convert.attribute_request_from_pb(request_, LIMITS, 64)


def test_sampling_edges_accepted() -> None:
    """The edges of each range pass, mapped as vLLM maps them (tests/e2e checks vLLM's own
    SamplingParams accepts the results)."""
    req = convert.generate_request_from_pb(
        pb.GenerateRequest(
            prompt="a",
            temperature=2.0,
            top_p=1.0,
            top_k=2**32 - 1,
            repetition_penalty=3.0e38,
            seed=2**64 - 1,
        ),
        LIMITS,
    )
    assert req.temperature == 2.0 and req.top_p == 1.0 and req.seed == 2**64 - 1
    tiny = convert.generate_request_from_pb(pb.GenerateRequest(prompt="a", temperature=1e-30), L)
    assert tiny.temperature == convert.MIN_TEMPERATURE  # vLLM raises (0, 0.01) to 0.01
    greedy = convert.generate_request_from_pb(pb.GenerateRequest(prompt="a"), L)
    assert greedy.temperature == 0.0 and greedy.repetition_penalty == 1.0


def _max_requests() -> dict[str, object]:
    """The largest request each method accepts: every field at its bound (a valid one)."""
    ref = pb.FeatureRef(
        dictionary_id="d" * L.max_id_bytes, index=2**32 - 1, fingerprint="f" * L.max_id_bytes
    )
    text = "é" * (L.max_text_bytes // 2)
    end = L.max_tokens_per_input + L.max_new_tokens
    iv = pb.Intervention(
        vector=pb.VectorTarget(
            hook_name="h" * L.max_id_bytes, values=[-1.5e38] * L.max_vector_values
        ),
        op=pb.Intervention.OP_CLAMP,
        value=-1.5e38,
        normalize=True,
        apply_to=pb.Intervention.APPLY_TO_GENERATED,
        positions=[end - 1] * end,
        when=pb.Condition(feature=ref, above=-1.5e38),
    )
    per_message = L.max_text_bytes // L.max_messages - L.max_id_bytes
    return {
        "Tokenize": pb.TokenizeRequest(text=text, prepend_bos=False),
        "DecodeFeatures": pb.DecodeFeaturesRequest(
            inputs=[pb.DecodeInput(text=text)] * (L.max_inputs - 1)
            + [pb.DecodeInput(token_ids=[2**32 - 1] * L.max_tokens_per_input)],
            prepend_bos=False,
            dictionary_ids=[str(i) * L.max_id_bytes for i in range(L.max_dictionaries_per_call)],
            top_k=L.max_top_k,
            features=[ref] * L.max_features_per_call,
            include_error=True,
        ),
        "Generate": pb.GenerateRequest(
            messages=[pb.ChatMessage(role="r" * L.max_id_bytes, content="c" * per_message)]
            * L.max_messages,
            prepend_bos=False,
            max_new_tokens=L.max_new_tokens,
            temperature=2.0,
            top_p=0.5,
            top_k=2**32 - 1,
            repetition_penalty=1.5,
            seed=2**64 - 1,
            stop=["s" * L.max_stop_bytes] * L.max_stop_strings,
            logprobs=True,
            interventions=[iv] * L.max_interventions,
            trace=pb.TraceSpec(
                dictionary_id="d" * L.max_id_bytes,
                top_k=L.max_top_k,
                features=[ref] * L.max_features_per_call,
            ),
            compare_baseline=True,
        ),
        "Attribute": pb.AttributeRequest(
            prompt="a" * convert.attribute_prompt_bytes(L),
            prepend_bos=False,
            mode=pb.ATTRIBUTION_MODE_GRAPH,
            target_token_ids=[2**32 - 1] * convert.MAX_TARGET_TOKENS,
            max_logit_targets=convert.MAX_TARGET_TOKENS,
            desired_logit_prob=0.5,
            max_feature_nodes=L.max_feature_nodes,
            node_threshold=0.5,
            edge_threshold=0.5,
            dictionary_id="d" * L.max_id_bytes,
            batch_size=convert.MAX_ATTRIBUTION_BATCH,
            detach=True,
        ),
        "GetAttribution": pb.GetAttributionRequest(job_id="j" * L.max_id_bytes),
        "GetFeature": pb.GetFeatureRequest(feature=ref),
        "SearchFeatures": pb.SearchFeaturesRequest(
            query="é" * convert.MAX_QUERY_CHARS, dictionary_id="d" * L.max_id_bytes, limit=100
        ),
    }


def test_every_method_has_a_byte_limit_that_fits_its_largest_request() -> None:
    limits = convert.request_byte_limits(LIMITS)
    methods = pb.DESCRIPTOR.services_by_name["FeatureSteer"].methods_by_name
    assert set(limits) == set(methods)
    requests = _max_requests()
    # each passes convert (it is a request the server must take) and fits its limit
    convert.tokenize_request_from_pb(requests["Tokenize"], L)  # type: ignore[arg-type]
    convert.decode_request_from_pb(requests["DecodeFeatures"], L)  # type: ignore[arg-type]
    convert.generate_request_from_pb(requests["Generate"], L)  # type: ignore[arg-type]
    convert.attribute_request_from_pb(requests["Attribute"], L, 64)  # type: ignore[arg-type]
    convert.job_id_from_pb(requests["GetAttribution"], L)  # type: ignore[arg-type]
    convert.get_feature_request_from_pb(requests["GetFeature"], L)  # type: ignore[arg-type]
    convert.search_request_from_pb(requests["SearchFeatures"], L)  # type: ignore[arg-type]
    for method, msg in requests.items():
        size = msg.ByteSize()  # type: ignore[attr-defined]
        assert size <= limits[method], (method, size, limits[method])
        if limits[method] > 16384:  # not a loose bound (small ones are mostly slack)
            assert size > limits[method] // 2, (method, size, limits[method])
    # gRPC's receive limit is the largest of them: a few MiB, not the 64 MiB send limit
    assert max(limits.values()) < 8 * 1024 * 1024


def test_guarded_deserializer_never_raises() -> None:
    parse = guarded_deserializer(pb.TokenizeRequest.FromString, 100, "Tokenize")
    assert parse(pb.TokenizeRequest(text="hi").SerializeToString()).text == "hi"
    big = parse(pb.TokenizeRequest(text="a" * 200).SerializeToString())
    assert isinstance(big, _Refused) and big.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Tokenize" in big.message
    for garbage in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x02\xff\xfe"):
        bad = parse(garbage)
        assert isinstance(bad, _Refused) and bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert guarded_deserializer(None, 10, "m")(b"raw") == b"raw"


def test_messages_echo_at_most_200_characters_of_input() -> None:
    huge = "d" * 16384
    assert len(shown(huge)) < 240 and "16384 characters" in shown(huge)
    assert shown("short") == "'short'"
    with pytest.raises(NotFound) as err:
        pinned_dictionary({}, huge, "feature.dictionary_id")
    assert len(str(err.value)) < 300
    assert len(bounded_message("x" * 5000)) < 1100
