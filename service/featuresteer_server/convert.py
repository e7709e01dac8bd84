"""Protobuf ⇄ domain, and nothing else. Structural validation (exactly-one-of, limits)
happens here, once; checks that need the model or the dictionaries happen in the engine.

Size bounds (docs/SECURITY.md#limits) are checked on the protobuf containers themselves —
``len()`` of a repeated field or a string — before anything is copied into tuples, tokenized
or turned into tensors, and every request message has a byte limit (``request_byte_limits``:
the largest request its field bounds allow) that the interceptor enforces before parsing.
"""

from __future__ import annotations

import math
from collections.abc import Sized

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer_server import domain, jobs
from featuresteer_server.config import Limits
from featuresteer_server.errors import InvalidArgument
from featuresteer_server.tokenization import Token

# at least the longest token of the supported tokenizers in UTF-8 bytes (SmolLM2's longest is
# a run of 80 spaces after a newline, 81 bytes): N tokens never need more than N × this bytes
MAX_TOKEN_BYTES = 128
MAX_QUERY_CHARS = 1000  # SearchFeatures.query
MAX_TARGET_TOKENS = 64  # Attribute.target_token_ids, max_logit_targets
MAX_ATTRIBUTION_BATCH = 1024
# vLLM's SamplingParams range for temperature (sampling_params.py: [0, 2]; below 0.01 it
# raises the value to 0.01 with a warning per request): both engines follow it
MAX_TEMPERATURE = 2.0
MIN_TEMPERATURE = 0.01


def _bos(msg: object) -> bool:
    """``optional bool prepend_bos``: unset means true."""
    return bool(msg.prepend_bos) if msg.HasField("prepend_bos") else True  # type: ignore[attr-defined]


def _count(container: Sized, limit: int, field: str) -> int:
    """``len()`` of a repeated field (O(1) on protobuf containers), refused beyond ``limit``."""
    n = len(container)
    if n > limit:
        raise InvalidArgument(field, f"{n} entries > the limit of {limit}")
    return n


def _text(value: str, limit: int, field: str) -> str:
    """``value`` if its UTF-8 encoding has at most ``limit`` bytes, else INVALID_ARGUMENT
    (characters ≤ bytes ≤ 4 × characters: most strings are decided without encoding)."""
    if len(value) > limit or (4 * len(value) > limit and len(value.encode("utf-8")) > limit):
        raise InvalidArgument(field, f"longer than the limit of {limit} UTF-8 bytes")
    return value


def _id(value: str, limits: Limits, field: str) -> str:
    """An id or name field (dictionary id, fingerprint, hook, role, job id): ``max_id_bytes``."""
    return _text(value, limits.max_id_bytes, field)


def feature_ref_from_pb(ref: pb.FeatureRef, field: str, limits: Limits) -> domain.FeatureRef:
    if not ref.dictionary_id:
        raise InvalidArgument(f"{field}.dictionary_id", "required")
    has_fp = ref.HasField("fingerprint")
    return domain.FeatureRef(
        dictionary_id=_id(ref.dictionary_id, limits, f"{field}.dictionary_id"),
        index=int(ref.index),
        fingerprint=_id(ref.fingerprint, limits, f"{field}.fingerprint") if has_fp else None,
    )


def feature_ref_to_pb(ref: domain.FeatureRef) -> pb.FeatureRef:
    out = pb.FeatureRef(dictionary_id=ref.dictionary_id, index=ref.index)
    if ref.fingerprint is not None:
        out.fingerprint = ref.fingerprint
    return out


def token_to_pb(t: Token) -> pb.Token:
    return pb.Token(
        id=t.id, text=t.text, bytes=t.bytes, start=t.start, end=t.end, special=t.special
    )


def provenance_to_pb(p: domain.Provenance) -> pb.Provenance:
    out = pb.Provenance(
        model_name=p.model_name,
        model_weights_hash=p.model_weights_hash,
        engine=p.engine,
        dtype=p.dtype,
        dictionary_fingerprints=p.dictionary_fingerprints,
        steering_spec_fingerprint=p.steering_spec_fingerprint,
        server_version=p.server_version,
        request_id=p.request_id,
    )
    if p.seed is not None:
        out.seed = p.seed
    return out


# -- GetInfo / ListDictionaries


def dictionary_info_to_pb(d: domain.DictionaryInfo) -> pb.DictionaryInfo:
    out = pb.DictionaryInfo(
        id=d.id,
        fingerprint=d.fingerprint,
        architecture=d.architecture,
        hook_name=d.hook_name,
        hook_name_out=d.hook_name_out if d.is_transcoder else "",
        d_in=d.d_in,
        d_sae=d.d_sae,
        source=d.source,
        version=d.version,
        description=d.description,
    )
    for name in ("l0", "fvu", "dead_fraction", "ce_loss_delta", "k"):
        value = getattr(d, name)
        if value is not None:
            setattr(out, name, value)
    return out


def dictionaries_to_pb(infos: tuple[domain.DictionaryInfo, ...]) -> pb.ListDictionariesResponse:
    return pb.ListDictionariesResponse(dictionaries=[dictionary_info_to_pb(d) for d in infos])


def limits_to_pb(limits: Limits) -> pb.Limits:
    return pb.Limits(
        max_tokens_per_input=limits.max_tokens_per_input,
        max_inputs=limits.max_inputs,
        max_top_k=limits.max_top_k,
        max_dictionaries_per_call=limits.max_dictionaries_per_call,
        max_new_tokens=limits.max_new_tokens,
        max_interventions=limits.max_interventions,
        max_attribution_tokens=limits.max_attribution_tokens,
        max_feature_nodes=limits.max_feature_nodes,
        max_concurrent_attributions=limits.max_concurrent_attributions,
        max_message_bytes=limits.max_message_bytes,
    )


def info_to_pb(info: domain.EngineInfo, limits: Limits, version: str) -> pb.GetInfoResponse:
    m = info.model
    return pb.GetInfoResponse(
        model=pb.ModelInfo(
            name=m.name,
            weights_hash=m.weights_hash,
            n_layers=m.n_layers,
            d_model=m.d_model,
            d_vocab=m.d_vocab,
            hook_names=list(m.hook_names),
            n_heads=m.n_heads,
            d_mlp=m.d_mlp,
            dtype=m.dtype,
            bos_token_id=m.bos_token_id,
            source=m.source,
        ),
        dictionaries=[dictionary_info_to_pb(d) for d in info.dictionaries],
        engines=list(info.engines),
        generation_engine=info.generation_engine,
        version=version,
        limits=limits_to_pb(limits),
    )


# -- Tokenize


def tokenize_request_from_pb(req: pb.TokenizeRequest, limits: Limits) -> domain.TokenizeRequest:
    # a UTF-8 byte bound before tokenizing; the token bound is checked on the tokens
    text = _text(req.text, limits.max_text_bytes, "text")
    return domain.TokenizeRequest(
        text=text, prepend_bos=_bos(req), max_tokens=limits.max_tokens_per_input
    )


def tokens_to_pb(tokens: list[Token], limits: Limits) -> pb.TokenizeResponse:
    if len(tokens) > limits.max_tokens_per_input:
        raise InvalidArgument(
            "text", f"{len(tokens)} tokens > max_tokens_per_input {limits.max_tokens_per_input}"
        )
    return pb.TokenizeResponse(tokens=[token_to_pb(t) for t in tokens])


# -- DecodeFeatures


def decode_request_from_pb(req: pb.DecodeFeaturesRequest, limits: Limits) -> domain.DecodeRequest:
    # every count first (len() of the containers), then each element's size, then copies
    if not req.inputs:
        raise InvalidArgument("inputs", "at least one input is required")
    _count(req.inputs, limits.max_inputs, "inputs")
    _count(req.dictionary_ids, limits.max_dictionaries_per_call, "dictionary_ids")
    _count(req.features, limits.max_features_per_call, "features")
    if req.top_k > limits.max_top_k:
        raise InvalidArgument("top_k", f"{req.top_k} > max_top_k {limits.max_top_k}")
    if req.top_k == 0 and not req.features and not req.include_error:
        raise InvalidArgument("top_k", "nothing to return: set top_k, features or include_error")
    for i, inp in enumerate(req.inputs):
        has_ids = len(inp.token_ids) > 0
        if has_ids:
            _count(inp.token_ids, limits.max_tokens_per_input, f"inputs[{i}].token_ids")
        else:
            _text(inp.text, limits.max_text_bytes, f"inputs[{i}].text")
        if has_ids == bool(inp.text):
            raise InvalidArgument(f"inputs[{i}]", "set exactly one of text or token_ids")
    ids = tuple(_id(d, limits, f"dictionary_ids[{i}]") for i, d in enumerate(req.dictionary_ids))
    if len(set(ids)) != len(ids):
        raise InvalidArgument("dictionary_ids", "duplicate dictionary id")
    inputs = tuple(
        domain.DecodeInput(token_ids=tuple(int(t) for t in inp.token_ids))
        if len(inp.token_ids)
        else domain.DecodeInput(text=inp.text)
        for inp in req.inputs
    )
    return domain.DecodeRequest(
        inputs=inputs,
        prepend_bos=_bos(req),
        dictionary_ids=ids,
        top_k=int(req.top_k),
        features=tuple(
            feature_ref_from_pb(f, f"features[{i}]", limits) for i, f in enumerate(req.features)
        ),
        include_error=bool(req.include_error),
        max_response_bytes=limits.max_message_bytes,
    )


def _acts(pairs: tuple[tuple[int, float], ...]) -> list[pb.FeatureActivation]:
    return [pb.FeatureActivation(index=i, activation=v) for i, v in pairs]


def decode_result_to_pb(res: domain.DecodeResult) -> pb.DecodeFeaturesResponse:
    items = []
    for item in res.items:
        items.append(
            pb.DecodeItem(
                tokens=[token_to_pb(t) for t in item.tokens],
                results=[
                    pb.DictionaryResult(
                        dictionary_id=r.dictionary_id,
                        positions=[
                            pb.PositionFeatures(
                                position=p.position,
                                top=_acts(p.top),
                                selected=_acts(p.selected),
                                error_norm=p.error_norm,
                                fvu=p.fvu,
                            )
                            for p in r.positions
                        ],
                    )
                    for r in item.results
                ],
            )
        )
    return pb.DecodeFeaturesResponse(items=items, provenance=provenance_to_pb(res.provenance))


# -- Generate

_OPS = {
    pb.Intervention.OP_ADD: domain.Op.ADD,
    pb.Intervention.OP_SCALE: domain.Op.SCALE,
    pb.Intervention.OP_CLAMP: domain.Op.CLAMP,
    pb.Intervention.OP_ABLATE: domain.Op.ABLATE,
}
_APPLY_TO = {
    pb.Intervention.APPLY_TO_UNSPECIFIED: domain.ApplyTo.ALL,
    pb.Intervention.APPLY_TO_ALL: domain.ApplyTo.ALL,
    pb.Intervention.APPLY_TO_PROMPT: domain.ApplyTo.PROMPT,
    pb.Intervention.APPLY_TO_GENERATED: domain.ApplyTo.GENERATED,
}
_FINISH = {
    domain.FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    domain.FinishReason.STOP: pb.FINISH_REASON_STOP,
    domain.FinishReason.EOS: pb.FINISH_REASON_EOS,
    domain.FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
DEFAULT_MAX_NEW_TOKENS = 64


def _max_position(limits: Limits) -> int:
    """No input position reaches this: a prompt plus its generated tokens is shorter."""
    return limits.max_tokens_per_input + limits.max_new_tokens


def intervention_from_pb(iv: pb.Intervention, field: str, limits: Limits) -> domain.Intervention:
    has_feature, has_vector = iv.HasField("feature"), iv.HasField("vector")
    if has_feature == has_vector:
        raise InvalidArgument(field, "set exactly one of feature or vector")
    op = _OPS.get(iv.op)
    if op is None:
        raise InvalidArgument(f"{field}.op", "required: OP_ADD, OP_SCALE, OP_CLAMP or OP_ABLATE")
    apply_to = _APPLY_TO.get(iv.apply_to)
    if apply_to is None:
        raise InvalidArgument(f"{field}.apply_to", f"unknown value {iv.apply_to}")
    # the counts before any copy: positions are rebuilt as a tensor every step, and a vector
    # of millions of floats cost +700 MiB as a tuple before its width was checked
    end = _max_position(limits)
    _count(iv.positions, end, f"{field}.positions")
    if has_vector:
        _count(iv.vector.values, limits.max_vector_values, f"{field}.vector.values")
    positions = tuple(int(p) for p in iv.positions)
    if positions and max(positions) >= end:
        raise InvalidArgument(
            f"{field}.positions",
            f"{max(positions)} is beyond any input (max_tokens_per_input + max_new_tokens = {end})",
        )
    when = None
    if iv.HasField("when"):
        if not iv.when.HasField("feature"):
            raise InvalidArgument(f"{field}.when.feature", "required")
        when = domain.Condition(
            feature=feature_ref_from_pb(iv.when.feature, f"{field}.when.feature", limits),
            above=float(iv.when.above),
        )
    vector = None
    if has_vector:
        if not iv.vector.hook_name:
            raise InvalidArgument(f"{field}.vector.hook_name", "required")
        vector = domain.VectorTarget(
            hook_name=_id(iv.vector.hook_name, limits, f"{field}.vector.hook_name"),
            values=tuple(float(v) for v in iv.vector.values),
        )
    feature = feature_ref_from_pb(iv.feature, f"{field}.feature", limits) if has_feature else None
    return domain.Intervention(
        op=op,
        value=float(iv.value),
        feature=feature,
        vector=vector,
        normalize=bool(iv.normalize),
        apply_to=apply_to,
        positions=positions,
        when=when,
    )


def _temperature(value: float) -> float:
    """0 (greedy) or vLLM's range [0.01, 2]; (0, 0.01) becomes 0.01 as vLLM makes it (on the
    hooked engine a tinier one overflowed the logits into NaN)."""
    if not math.isfinite(value) or not 0.0 <= value <= MAX_TEMPERATURE:
        raise InvalidArgument(
            "temperature", f"must be 0 (greedy) or in (0, {MAX_TEMPERATURE}], got {value:g}"
        )
    return max(value, MIN_TEMPERATURE) if value > 0 else 0.0


def _chat(req: pb.GenerateRequest, limits: Limits) -> tuple[tuple[str, str], ...]:
    """The messages, within ``max_messages`` and, all contents and roles together,
    ``max_text_bytes`` (they are tokenized as one chat prompt)."""
    _count(req.messages, limits.max_messages, "messages")
    limit = limits.max_text_bytes
    chat = []
    for i, m in enumerate(req.messages):
        if not m.role:
            raise InvalidArgument(f"messages[{i}].role", "required")
        role = _id(m.role, limits, f"messages[{i}].role")
        chat.append((role, _text(m.content, limit, f"messages[{i}].content")))
    chars = sum(len(r) + len(c) for r, c in chat)  # ≤ bytes ≤ 4 × chars
    if chars > limit or (
        4 * chars > limit and sum(len(r.encode()) + len(c.encode()) for r, c in chat) > limit
    ):
        raise InvalidArgument("messages", f"longer than the limit of {limit} UTF-8 bytes together")
    return tuple(chat)


def generate_request_from_pb(req: pb.GenerateRequest, limits: Limits) -> domain.GenerateRequest:
    _count(req.interventions, limits.max_interventions, "interventions")
    _count(req.stop, limits.max_stop_strings, "stop")
    if bool(req.prompt) == bool(req.messages):
        raise InvalidArgument("prompt", "set exactly one of prompt or messages")
    for name in ("preset", "experiment", "unit_id"):
        if getattr(req, name):
            _id(getattr(req, name), limits, name)
            raise InvalidArgument(name, "presets and experiments are not served yet")
    prompt = _text(req.prompt, limits.max_text_bytes, "prompt")
    messages = _chat(req, limits)
    max_new = int(req.max_new_tokens) or min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens)
    if max_new > limits.max_new_tokens:
        raise InvalidArgument(
            "max_new_tokens", f"{max_new} > the server's limit {limits.max_new_tokens}"
        )
    temperature = _temperature(req.temperature)
    # 0 means "off" for both; vLLM wants top_p in (0, 1] and repetition_penalty > 0, finite
    if not math.isfinite(req.top_p) or not 0.0 <= req.top_p <= 1.0:
        raise InvalidArgument("top_p", f"must be in [0, 1] (0: off), got {req.top_p:g}")
    if not math.isfinite(req.repetition_penalty) or req.repetition_penalty < 0.0:
        raise InvalidArgument(
            "repetition_penalty",
            f"must be finite and >= 0 (0: off), got {req.repetition_penalty:g}",
        )
    for i, stop in enumerate(req.stop):
        if not stop:
            raise InvalidArgument(f"stop[{i}]", "empty stop string")
        _text(stop, limits.max_stop_bytes, f"stop[{i}]")
    trace = None
    if req.HasField("trace"):
        if req.trace.top_k > limits.max_top_k:
            raise InvalidArgument(
                "trace.top_k", f"{req.trace.top_k} > max_top_k {limits.max_top_k}"
            )
        _count(req.trace.features, limits.max_features_per_call, "trace.features")
        trace = domain.TraceSpec(
            dictionary_id=_id(req.trace.dictionary_id, limits, "trace.dictionary_id"),
            top_k=int(req.trace.top_k),
            features=tuple(
                feature_ref_from_pb(f, f"trace.features[{i}]", limits)
                for i, f in enumerate(req.trace.features)
            ),
        )
    return domain.GenerateRequest(
        prompt=prompt or None,
        messages=messages,
        prepend_bos=_bos(req),
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=float(req.top_p) if 0.0 < req.top_p < 1.0 else 1.0,
        top_k=int(req.top_k),
        repetition_penalty=float(req.repetition_penalty) if req.repetition_penalty else 1.0,
        seed=int(req.seed) if req.HasField("seed") else None,
        stop=tuple(req.stop),
        logprobs=bool(req.logprobs),
        interventions=tuple(
            intervention_from_pb(iv, f"interventions[{i}]", limits)
            for i, iv in enumerate(req.interventions)
        ),
        trace=trace,
        compare_baseline=bool(req.compare_baseline),
    )


def generate_chunk_to_pb(c: domain.GenerateChunk) -> pb.GenerateResponse:
    out = pb.GenerateResponse(
        text=c.text, position=c.position, trace=_acts(c.trace), baseline=c.baseline
    )
    if c.token is not None:
        out.token.CopyFrom(token_to_pb(c.token))
    if c.logprob is not None:
        out.logprob = c.logprob
    if c.finish_reason is not None:
        out.finish_reason = _FINISH[c.finish_reason]
    if c.usage is not None:
        out.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=c.usage.prompt_tokens, completion_tokens=c.usage.completion_tokens
            )
        )
    if c.provenance is not None:
        out.provenance.CopyFrom(provenance_to_pb(c.provenance))
    return out


# -- Attribute

_MODES = {
    pb.ATTRIBUTION_MODE_UNSPECIFIED: "graph",
    pb.ATTRIBUTION_MODE_GRAPH: "graph",
    pb.ATTRIBUTION_MODE_LOGIT_RANKING: "logit_ranking",
}
_NODE_KINDS = {
    "embedding": pb.Node.KIND_EMBEDDING,
    "feature": pb.Node.KIND_FEATURE,
    "error": pb.Node.KIND_ERROR,
    "logit": pb.Node.KIND_LOGIT,
}


def _unit_interval(value: float, field: str, *, open_low: bool = True) -> float:
    if not math.isfinite(value) or value > 1 or value < 0 or (open_low and value == 0):
        raise InvalidArgument(field, f"{value} outside (0, 1]")
    return float(value)


def attribute_request_from_pb(
    req: pb.AttributeRequest, limits: Limits, batch_size: int
) -> domain.AttributeRequest:
    if not req.prompt:
        raise InvalidArgument("prompt", "required")
    _count(req.target_token_ids, MAX_TARGET_TOKENS, "target_token_ids")
    prompt = _text(req.prompt, attribute_prompt_bytes(limits), "prompt")
    dictionary_id = _id(req.dictionary_id, limits, "dictionary_id")
    mode = _MODES.get(req.mode)
    if mode is None:
        raise InvalidArgument("mode", f"unknown mode {req.mode}")
    if mode == "logit_ranking" and not req.dictionary_id:
        raise InvalidArgument("dictionary_id", "LOGIT_RANKING needs the dictionary to rank")
    if mode == "logit_ranking" and len(req.target_token_ids) != 1:
        raise InvalidArgument("target_token_ids", "LOGIT_RANKING needs exactly one target token")
    nodes = req.max_feature_nodes or limits.max_feature_nodes
    if nodes > limits.max_feature_nodes:
        raise InvalidArgument(
            "max_feature_nodes", f"{nodes} > the server's limit {limits.max_feature_nodes}"
        )
    if req.max_logit_targets > MAX_TARGET_TOKENS:
        raise InvalidArgument("max_logit_targets", f"{req.max_logit_targets} > {MAX_TARGET_TOKENS}")
    if req.batch_size > MAX_ATTRIBUTION_BATCH:
        raise InvalidArgument("batch_size", f"{req.batch_size} > {MAX_ATTRIBUTION_BATCH}")
    return domain.AttributeRequest(
        prompt=prompt,
        prepend_bos=_bos(req),
        mode=mode,
        target_token_ids=tuple(int(t) for t in req.target_token_ids),
        max_logit_targets=int(req.max_logit_targets or 10),
        desired_logit_prob=_unit_interval(
            req.desired_logit_prob if req.HasField("desired_logit_prob") else 0.95,
            "desired_logit_prob",
        ),
        max_feature_nodes=int(nodes),
        node_threshold=_unit_interval(
            req.node_threshold if req.HasField("node_threshold") else 0.8, "node_threshold"
        ),
        edge_threshold=_unit_interval(
            req.edge_threshold if req.HasField("edge_threshold") else 0.98, "edge_threshold"
        ),
        dictionary_id=dictionary_id,
        batch_size=int(req.batch_size or batch_size),
        detach=bool(req.detach),
    )


def graph_to_pb(res: domain.AttributionResult) -> pb.Graph:
    return pb.Graph(
        nodes=[
            pb.Node(
                id=i,
                kind=_NODE_KINDS[n.kind],
                layer=n.layer,
                position=n.position,
                feature=feature_ref_to_pb(n.feature) if n.feature is not None else None,
                activation=n.activation,
                influence=n.influence,
                label=n.label,
                token_id=n.token_id,
                probability=n.probability,
                constant=n.constant,
            )
            for i, n in enumerate(res.nodes)
        ],
        edges=[pb.Edge(source=s, target=t, weight=w) for s, t, w in res.edges],
        scores=pb.Scores(replacement=res.replacement_score, completeness=res.completeness_score),
        tokens=[token_to_pb(t) for t in res.tokens],
    )


def ranking_to_pb(res: domain.AttributionResult) -> list[pb.RankingEntry]:
    return [
        pb.RankingEntry(feature=feature_ref_to_pb(ref), position=pos, attribution=value)
        for ref, pos, value in res.ranking
    ]


def attribution_result_to_pb(job_id: str, res: domain.AttributionResult) -> pb.AttributeResponse:
    out = pb.AttributeResponse(
        job_id=job_id,
        provenance=provenance_to_pb(res.provenance),
        progress=pb.Progress(stage="done", fraction=1.0),
    )
    if res.ranking:
        out.ranking.extend(ranking_to_pb(res))
    else:
        out.graph.CopyFrom(graph_to_pb(res))
    return out


_JOB_STATES = {
    jobs.JobState.QUEUED: pb.JOB_STATE_QUEUED,
    jobs.JobState.RUNNING: pb.JOB_STATE_RUNNING,
    jobs.JobState.DONE: pb.JOB_STATE_DONE,
    jobs.JobState.FAILED: pb.JOB_STATE_FAILED,
    jobs.JobState.CANCELLED: pb.JOB_STATE_CANCELLED,
}


def job_update_to_pb(update: jobs.JobUpdate) -> pb.AttributeResponse:
    """One Attribute stream message: the job id, progress, or the finished result."""
    if update.result is not None:
        return attribution_result_to_pb(update.job_id, update.result)
    if update.stage is None:
        return pb.AttributeResponse(job_id=update.job_id)
    progress = pb.Progress(stage=update.stage, fraction=update.fraction)
    return pb.AttributeResponse(job_id=update.job_id, progress=progress)


def job_to_pb(job: jobs.Job) -> pb.GetAttributionResponse:
    """GetAttribution: state, progress, the result when done, and the error a client may see
    (``jobs.public_error``: never raw exception text)."""
    out = pb.GetAttributionResponse(
        job_id=job.id,
        state=_JOB_STATES[job.state],
        progress=pb.Progress(stage=job.stage, fraction=job.fraction),
        error=job.error_message,
    )
    result: domain.AttributionResult | None = (
        job.result if job.state is jobs.JobState.DONE else None
    )
    if result is not None:
        out.provenance.CopyFrom(provenance_to_pb(result.provenance))
        if result.ranking:
            out.ranking.extend(ranking_to_pb(result))
        else:
            out.graph.CopyFrom(graph_to_pb(result))
    return out


# -- Feature catalog


def get_feature_request_from_pb(req: pb.GetFeatureRequest, limits: Limits) -> domain.FeatureRef:
    if not req.HasField("feature"):
        raise InvalidArgument("feature", "required")
    return feature_ref_from_pb(req.feature, "feature", limits)


def _token_values(values: tuple[domain.TokenValue, ...]) -> list[pb.TokenValue]:
    return [pb.TokenValue(token=token_to_pb(v.token), value=v.value) for v in values]


def feature_to_pb(f: domain.Feature) -> pb.GetFeatureResponse:
    return pb.GetFeatureResponse(
        feature=feature_ref_to_pb(f.feature),
        label=f.label,
        density=f.density,
        max_activation=f.max_activation,
        top_examples=[
            pb.FeatureExample(
                tokens=[token_to_pb(t) for t in e.tokens], activations=list(e.activations)
            )
            for e in f.top_examples
        ],
        top_logits=_token_values(f.top_logits),
        bottom_logits=_token_values(f.bottom_logits),
    )


def search_request_from_pb(req: pb.SearchFeaturesRequest, limits: Limits) -> domain.SearchRequest:
    has_token = req.HasField("token_id")
    if len(req.query) > MAX_QUERY_CHARS:
        raise InvalidArgument("query", f"{len(req.query)} characters > {MAX_QUERY_CHARS}")
    query = req.query.strip()
    if has_token and query:
        raise InvalidArgument("query", "set query or token_id, not both")
    if not has_token and not query:
        raise InvalidArgument("query", "set query (non-blank) or token_id")
    if req.limit > limits.max_search_limit:
        raise InvalidArgument("limit", f"{req.limit} > max_search_limit {limits.max_search_limit}")
    return domain.SearchRequest(
        query=query if not has_token else None,
        token_id=int(req.token_id) if has_token else None,
        dictionary_id=_id(req.dictionary_id, limits, "dictionary_id"),
        limit=int(req.limit) or limits.default_search_limit,
    )


def search_result_to_pb(res: domain.SearchResult) -> pb.SearchFeaturesResponse:
    return pb.SearchFeaturesResponse(
        features=[
            pb.FeatureMatch(feature=feature_ref_to_pb(m.feature), label=m.label, score=m.score)
            for m in res.matches
        ]
    )


# -- GetAttribution


def job_id_from_pb(req: pb.GetAttributionRequest, limits: Limits) -> str:
    if not req.job_id:
        raise InvalidArgument("job_id", "required")
    return _id(req.job_id, limits, "job_id")


# -- request byte limits

# wire overhead of one length-delimited field or repeated entry: a tag (1-2 bytes) and a
# length varint (≤ 5); scalars are counted unpacked (tag + value), which bounds packed too
_FIELD = 7
_VARINT = 6  # tag + a uint32 varint
_FLOAT = 5  # tag + 4 bytes
_SLACK = 1024  # every scalar field of a message together, with room to spare


def attribute_prompt_bytes(limits: Limits) -> int:
    """Attribute's prompt: ``MAX_TOKEN_BYTES`` per attributable token, within max_text_bytes."""
    return min(limits.max_text_bytes, MAX_TOKEN_BYTES * limits.max_attribution_tokens)


def request_byte_limits(limits: Limits) -> dict[str, int]:
    """The largest encoded request each FeatureSteer method accepts: the sum of its field
    bounds, so a request within every field bound always fits and anything larger is refused
    before it is parsed (by the error interceptor, RESOURCE_EXHAUSTED like gRPC's own limit)."""
    ident = limits.max_id_bytes + _FIELD
    ref = 2 * ident + _VARINT + _FIELD  # FeatureRef: dictionary_id, fingerprint, index
    text = limits.max_text_bytes + _FIELD
    decode_input = max(text, limits.max_tokens_per_input * _VARINT) + 2 * _FIELD
    chat = limits.max_text_bytes + limits.max_messages * (ident + 2 * _FIELD)
    intervention = (
        2 * ref  # feature, when.feature
        + ident  # vector.hook_name
        + limits.max_vector_values * _FLOAT
        + _max_position(limits) * _VARINT
        + 4 * _FIELD
    )
    generate = (
        max(text, chat)
        + limits.max_stop_strings * (limits.max_stop_bytes + _FIELD)
        + limits.max_interventions * intervention
        + ident  # trace.dictionary_id
        + limits.max_features_per_call * ref  # trace.features
        + 3 * ident  # preset, experiment, unit_id
    )
    out = {
        "GetInfo": 0,
        "ListDictionaries": 0,
        "Tokenize": text,
        "DecodeFeatures": limits.max_inputs * decode_input
        + limits.max_dictionaries_per_call * ident
        + limits.max_features_per_call * ref,
        "Generate": generate,
        "Attribute": attribute_prompt_bytes(limits) + _FIELD + ident + MAX_TARGET_TOKENS * _VARINT,
        "GetAttribution": ident,
        "GetFeature": ref,
        "SearchFeatures": 4 * MAX_QUERY_CHARS + _FIELD + ident,
    }
    return {method: n + _SLACK for method, n in out.items()}
