"""The public surfaces are pinned so they never grow by accident."""

import keybroker_client

import broker


def test_broker_public_names():
    """broker exports exactly its documented names."""
    assert broker.__all__ == ["Broker", "BrokerError", "Clock", "LeaseEngine", "ManualClock",
                              "Settings", "SystemClock", "load_settings"]
    for name in broker.__all__:
        assert getattr(broker, name).__module__.startswith("broker")


def test_engine_public_names():
    """broker.engine exports exactly the facade, its config and the values it takes and gives."""
    import broker.engine

    assert broker.engine.__all__ == [
        "Caller", "EngineConfig", "InternalRoute", "KeySnapshot", "KeySource", "KeyView",
        "LeaseEngine", "LeaseGrant", "LeaseRequest", "ModelChooser", "ReloadResult"]
    for name in broker.engine.__all__:
        assert getattr(broker.engine, name).__module__.startswith("broker.engine")


def test_client_public_names():
    """keybroker_client exports exactly its documented names."""
    assert keybroker_client.__all__ == [
        "AsyncKeyBrokerClient", "BrokerError", "ChatResult", "ChatStream", "InvalidArgument",
        "KeyBrokerClient", "Lease", "LeaseNotActive", "NotFound", "OpenRouterClient",
        "OpenRouterError", "PermissionDenied", "QuotaExhausted", "QuotaViolation",
        "RouteInternal", "SyncChatStream", "SyncOpenRouterClient", "Unauthenticated",
        "Unavailable"]
    for name in keybroker_client.__all__:
        assert getattr(keybroker_client, name).__module__.startswith("keybroker_client")
