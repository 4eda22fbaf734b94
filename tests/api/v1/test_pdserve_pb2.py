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


def test_routing_reason_is_a_new_field_old_readers_and_writers_still_agree() -> None:
    field = pb.Routing.DESCRIPTOR.fields_by_name["reason"]
    assert field.number == 6 and pb.Routing.DESCRIPTOR.fields_by_name["transferred_blocks"].number == 5
    old_wire = pb.Routing(decode_instance="d0", cached_tokens=16).SerializeToString()  # what an old router sends
    assert pb.Routing.FromString(old_wire).reason == ""
    new = pb.Routing(decode_instance="d0", reason="local: no prefill instance")
    assert pb.Routing.FromString(new.SerializeToString()).reason == "local: no prefill instance"


def test_api_keeps_its_package_and_service_name() -> None:
    # NOTE: clients name these on the wire; the Python package moving to api.v1 must not change them.
    assert pb.DESCRIPTOR.package == "pdserve.v1"
    assert pb.DESCRIPTOR.services_by_name["PDServe"].full_name == "pdserve.v1.PDServe"
