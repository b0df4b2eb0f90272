"""On-chain deposits (issue 13): an EVM chain's transfers to the exchange's deposit addresses,
followed through confirmations and reorganizations (`scanner`), read over JSON-RPC (`rpc`);
`anvil` runs a local node for the tests."""
