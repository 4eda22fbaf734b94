"""The v1 API messages: unset is distinct from zero, the prompt is text or token ids."""

from api.v1 import pdserve_pb2 as pb


def test_unset_sampling_fields_are_distinct_from_zero() -> None:
    sp = pb.SamplingParams(temperature=0.0, max_tokens=5)
    assert sp.HasField("temperature") and sp.temperature == 0.0
    assert not sp.HasField("top_p") and not sp.HasField("seed")
    wire = pb.SamplingParams.FromString(sp.SerializeToString())
    assert wire.HasField("temperature") and not wire.HasField("top_k")


def test_prompt_is_text_or_token_ids() -> None:
    req = pb.GenerateRequest(text="hi")
    assert req.WhichOneof("prompt") == "text"
    req.token_ids.ids.extend([1, 2, 3])
    assert req.WhichOneof("prompt") == "token_ids" and not req.text


def test_final_message_carries_routing() -> None:
    last = pb.GenerateResponse(finished=True, finish_reason="length", usage=pb.Usage(prompt_tokens=3,
                               completion_tokens=2), routing=pb.Routing(decode_instance="d0", cached_tokens=16))
    assert last.routing.prefill_instance == "" and not last.routing.disaggregated
