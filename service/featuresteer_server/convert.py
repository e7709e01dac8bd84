"""Protobuf ⇄ domain, and nothing else. Structural validation (exactly-one-of, limits)
happens here, once; checks that need the model or the dictionaries happen in the engine."""

from __future__ import annotations

import math

from featuresteer.v1 import featuresteer_pb2 as pb
from featuresteer_server import domain
from featuresteer_server.config import Limits
from featuresteer_server.errors import InvalidArgument
from featuresteer_server.tokenization import Token


def _bos(msg: object) -> bool:
    """``optional bool prepend_bos``: unset means true."""
    return bool(msg.prepend_bos) if msg.HasField("prepend_bos") else True  # type: ignore[attr-defined]


def feature_ref_from_pb(ref: pb.FeatureRef, field: str) -> domain.FeatureRef:
    if not ref.dictionary_id:
        raise InvalidArgument(f"{field}.dictionary_id", "required")
    return domain.FeatureRef(
        dictionary_id=ref.dictionary_id,
        index=int(ref.index),
        fingerprint=ref.fingerprint if ref.HasField("fingerprint") else None,
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
    # a UTF-8 byte bound before tokenizing; the token bound is the engine's to check
    if len(req.text.encode("utf-8")) > limits.max_tokens_per_input * 64:
        raise InvalidArgument("text", "longer than the server's limit")
    return domain.TokenizeRequest(text=req.text, prepend_bos=_bos(req))


def tokens_to_pb(tokens: list[Token], limits: Limits) -> pb.TokenizeResponse:
    if len(tokens) > limits.max_tokens_per_input:
        raise InvalidArgument(
            "text", f"{len(tokens)} tokens > max_tokens_per_input {limits.max_tokens_per_input}"
        )
    return pb.TokenizeResponse(tokens=[token_to_pb(t) for t in tokens])


# -- DecodeFeatures


def decode_request_from_pb(req: pb.DecodeFeaturesRequest, limits: Limits) -> domain.DecodeRequest:
    if not req.inputs:
        raise InvalidArgument("inputs", "at least one input is required")
    if len(req.inputs) > limits.max_inputs:
        raise InvalidArgument(
            "inputs", f"{len(req.inputs)} inputs > max_inputs {limits.max_inputs}"
        )
    inputs = []
    for i, inp in enumerate(req.inputs):
        if inp.text and inp.token_ids:
            raise InvalidArgument(f"inputs[{i}]", "set exactly one of text or token_ids, not both")
        if inp.token_ids:
            n = len(inp.token_ids)
            inputs.append(domain.DecodeInput(token_ids=tuple(int(t) for t in inp.token_ids)))
        else:
            if not inp.text:
                raise InvalidArgument(f"inputs[{i}]", "set exactly one of text or token_ids")
            n = len(inp.text.encode("utf-8")) // 64  # cheap lower bound; exact check below
            inputs.append(domain.DecodeInput(text=inp.text))
        if n > limits.max_tokens_per_input:
            raise InvalidArgument(
                f"inputs[{i}]",
                f"more than max_tokens_per_input {limits.max_tokens_per_input} tokens",
            )
    if req.top_k > limits.max_top_k:
        raise InvalidArgument("top_k", f"{req.top_k} > max_top_k {limits.max_top_k}")
    if len(req.dictionary_ids) > limits.max_dictionaries_per_call:
        raise InvalidArgument(
            "dictionary_ids",
            f"{len(req.dictionary_ids)} > max_dictionaries_per_call "
            f"{limits.max_dictionaries_per_call}",
        )
    if len(set(req.dictionary_ids)) != len(req.dictionary_ids):
        raise InvalidArgument("dictionary_ids", "duplicate dictionary id")
    if len(req.features) > limits.max_features_per_call:
        raise InvalidArgument(
            "features",
            f"{len(req.features)} > max_features_per_call {limits.max_features_per_call}",
        )
    if req.top_k == 0 and not req.features and not req.include_error:
        raise InvalidArgument("top_k", "nothing to return: set top_k, features or include_error")
    return domain.DecodeRequest(
        inputs=tuple(inputs),
        prepend_bos=_bos(req),
        dictionary_ids=tuple(req.dictionary_ids),
        top_k=int(req.top_k),
        features=tuple(
            feature_ref_from_pb(f, f"features[{i}]") for i, f in enumerate(req.features)
        ),
        include_error=bool(req.include_error),
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


def intervention_from_pb(iv: pb.Intervention, field: str) -> domain.Intervention:
    has_feature, has_vector = iv.HasField("feature"), iv.HasField("vector")
    if has_feature == has_vector:
        raise InvalidArgument(field, "set exactly one of feature or vector")
    op = _OPS.get(iv.op)
    if op is None:
        raise InvalidArgument(f"{field}.op", "required: OP_ADD, OP_SCALE, OP_CLAMP or OP_ABLATE")
    apply_to = _APPLY_TO.get(iv.apply_to)
    if apply_to is None:
        raise InvalidArgument(f"{field}.apply_to", f"unknown value {iv.apply_to}")
    when = None
    if iv.HasField("when"):
        if not iv.when.HasField("feature"):
            raise InvalidArgument(f"{field}.when.feature", "required")
        when = domain.Condition(
            feature=feature_ref_from_pb(iv.when.feature, f"{field}.when.feature"),
            above=float(iv.when.above),
        )
    vector = None
    if has_vector:
        if not iv.vector.hook_name:
            raise InvalidArgument(f"{field}.vector.hook_name", "required")
        vector = domain.VectorTarget(
            hook_name=iv.vector.hook_name, values=tuple(float(v) for v in iv.vector.values)
        )
    return domain.Intervention(
        op=op,
        value=float(iv.value),
        feature=feature_ref_from_pb(iv.feature, f"{field}.feature") if has_feature else None,
        vector=vector,
        normalize=bool(iv.normalize),
        apply_to=apply_to,
        positions=tuple(int(p) for p in iv.positions),
        when=when,
    )


def generate_request_from_pb(req: pb.GenerateRequest, limits: Limits) -> domain.GenerateRequest:
    if bool(req.prompt) == bool(req.messages):
        raise InvalidArgument("prompt", "set exactly one of prompt or messages")
    for name in ("preset", "experiment", "unit_id"):
        if getattr(req, name):
            raise InvalidArgument(name, "presets and experiments are not served yet")
    if len(req.prompt.encode("utf-8")) > limits.max_tokens_per_input * 64:
        raise InvalidArgument("prompt", "longer than the server's limit")
    for i, m in enumerate(req.messages):
        if not m.role:
            raise InvalidArgument(f"messages[{i}].role", "required")
    max_new = int(req.max_new_tokens) or min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens)
    if max_new > limits.max_new_tokens:
        raise InvalidArgument(
            "max_new_tokens", f"{max_new} > the server's limit {limits.max_new_tokens}"
        )
    checks = (
        ("temperature", req.temperature, 0.0),
        ("top_p", req.top_p, 0.0),
        ("repetition_penalty", req.repetition_penalty, 0.0),
    )
    for name, value, low in checks:
        if not math.isfinite(value) or value < low:
            raise InvalidArgument(name, f"must be finite and >= {low}, got {value}")
    if req.top_p > 1.0:
        raise InvalidArgument("top_p", f"must be in [0, 1], got {req.top_p}")
    if len(req.interventions) > limits.max_interventions:
        raise InvalidArgument(
            "interventions",
            f"{len(req.interventions)} > max_interventions {limits.max_interventions}",
        )
    if len(req.stop) > 16 or any(not s for s in req.stop):
        raise InvalidArgument("stop", "at most 16 non-empty stop strings")
    trace = None
    if req.HasField("trace"):
        if req.trace.top_k > limits.max_top_k:
            raise InvalidArgument(
                "trace.top_k", f"{req.trace.top_k} > max_top_k {limits.max_top_k}"
            )
        if len(req.trace.features) > limits.max_features_per_call:
            raise InvalidArgument(
                "trace.features",
                f"{len(req.trace.features)} > max_features_per_call {limits.max_features_per_call}",
            )
        trace = domain.TraceSpec(
            dictionary_id=req.trace.dictionary_id,
            top_k=int(req.trace.top_k),
            features=tuple(
                feature_ref_from_pb(f, f"trace.features[{i}]")
                for i, f in enumerate(req.trace.features)
            ),
        )
    return domain.GenerateRequest(
        prompt=req.prompt or None,
        messages=tuple((m.role, m.content) for m in req.messages),
        prepend_bos=_bos(req),
        max_new_tokens=max_new,
        temperature=float(req.temperature),
        top_p=float(req.top_p) if 0.0 < req.top_p < 1.0 else 1.0,
        top_k=int(req.top_k),
        repetition_penalty=float(req.repetition_penalty) if req.repetition_penalty else 1.0,
        seed=int(req.seed) if req.HasField("seed") else None,
        stop=tuple(req.stop),
        logprobs=bool(req.logprobs),
        interventions=tuple(
            intervention_from_pb(iv, f"interventions[{i}]")
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
    if req.max_logit_targets > 64:
        raise InvalidArgument("max_logit_targets", f"{req.max_logit_targets} > 64")
    if len(req.target_token_ids) > 64:
        raise InvalidArgument("target_token_ids", "at most 64 targets")
    if req.batch_size > 1024:
        raise InvalidArgument("batch_size", f"{req.batch_size} > 1024")
    return domain.AttributeRequest(
        prompt=req.prompt,
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
        dictionary_id=req.dictionary_id,
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
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "done": pb.JOB_STATE_DONE,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}


def job_to_pb(
    job_id: str,
    state: str,
    stage: str,
    fraction: float,
    result: domain.AttributionResult | None,
    error: str,
) -> pb.GetAttributionResponse:
    out = pb.GetAttributionResponse(
        job_id=job_id,
        state=_JOB_STATES[state],
        progress=pb.Progress(stage=stage, fraction=fraction),
        error=error,
    )
    if result is not None:
        out.provenance.CopyFrom(provenance_to_pb(result.provenance))
        if result.ranking:
            out.ranking.extend(ranking_to_pb(result))
        else:
            out.graph.CopyFrom(graph_to_pb(result))
    return out


# -- Feature catalog


def get_feature_request_from_pb(req: pb.GetFeatureRequest) -> domain.FeatureRef:
    if not req.HasField("feature"):
        raise InvalidArgument("feature", "required")
    return feature_ref_from_pb(req.feature, "feature")


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
    query = req.query.strip()
    if has_token and query:
        raise InvalidArgument("query", "set query or token_id, not both")
    if not has_token and not query:
        raise InvalidArgument("query", "set query (non-blank) or token_id")
    if len(query) > 1000:
        raise InvalidArgument("query", f"{len(query)} characters > 1000")
    if req.limit > limits.max_search_limit:
        raise InvalidArgument("limit", f"{req.limit} > max_search_limit {limits.max_search_limit}")
    return domain.SearchRequest(
        query=query if not has_token else None,
        token_id=int(req.token_id) if has_token else None,
        dictionary_id=req.dictionary_id,
        limit=int(req.limit) or limits.default_search_limit,
    )


def search_result_to_pb(res: domain.SearchResult) -> pb.SearchFeaturesResponse:
    return pb.SearchFeaturesResponse(
        features=[
            pb.FeatureMatch(feature=feature_ref_to_pb(m.feature), label=m.label, score=m.score)
            for m in res.matches
        ]
    )
