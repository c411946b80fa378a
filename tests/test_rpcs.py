"""The RPC vocabulary matches the proto."""

from keybroker_client.v1 import keybroker_pb2

from broker.rpcs import KEY_ADMIN_RPCS, KEY_BROKER_RPCS, Rpc


def _methods(service: str) -> set[str]:
    return {m.name for m in keybroker_pb2.DESCRIPTOR.services_by_name[service].methods}


def test_rpc_enum_is_the_proto_services():
    """Rpc has one member per method of KeyBroker and KeyAdmin, split by service."""
    assert set(KEY_BROKER_RPCS) == _methods("KeyBroker")
    assert set(KEY_ADMIN_RPCS) == _methods("KeyAdmin")
    assert {r.value for r in Rpc} == _methods("KeyBroker") | _methods("KeyAdmin")
