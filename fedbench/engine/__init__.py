"""The round loop: sampling, local training, payloads, aggregation, evaluation, metering."""
