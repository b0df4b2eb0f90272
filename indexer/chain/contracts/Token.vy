# pragma version 0.4.3
# A minimal ERC-20 for the chain watcher's tests (issue 13): the deployer holds the whole supply
# and sends it with `transfer`, which logs the standard Transfer event. Compiled offline by
# build.py into Token.json (committed), so tests need no compiler.

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

name: public(String[32])
symbol: public(String[8])
decimals: public(uint8)
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])


@deploy
def __init__():
    self.name = "Quorum Test Dollar"
    self.symbol = "QTD"
    self.decimals = 6
    self.totalSupply = 10**15
    self.balanceOf[msg.sender] = 10**15
    log Transfer(sender=empty(address), receiver=msg.sender, value=10**15)


@external
def transfer(_to: address, _value: uint256) -> bool:
    self.balanceOf[msg.sender] -= _value
    self.balanceOf[_to] += _value
    log Transfer(sender=msg.sender, receiver=_to, value=_value)
    return True
