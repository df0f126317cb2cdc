"""Bring your own network: ONNX graphs in as base models, fine-tuned models out as ONNX graphs
(`fleet model import`, `fleet model export`; coordinator side only, a device needs neither)."""
