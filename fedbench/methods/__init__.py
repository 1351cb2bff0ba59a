"""The method plugin contract and the headline method."""
