"""On-disk formats: GPTQ v1 packing and the model repos hubtool exports."""
