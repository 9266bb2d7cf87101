"""Code two or more services need: envelope, Avro codec, keys, Kafka wiring, settings, errors."""
