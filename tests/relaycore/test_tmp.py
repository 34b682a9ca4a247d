import relaycore.relay
def test_x():
    assert relaycore.relay.RelayServer
