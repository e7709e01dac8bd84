"""Protobuf ⇄ domain, and nothing else. Structural validation (exactly-one-of, limits)
happens here, once; checks that need the model or the dictionaries happen in the engine."""

from __future__ import annotations

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
        hook_name_out=d.hook_name_out,
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
