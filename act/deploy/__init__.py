"""Layer 4, export and deployment: the Q/DQ ONNX of a student (`export`), its hygiene (`onnx_hygiene`) and Q/DQ
placement rules per target (`lint`), the runtimes a model is deployed with: TensorRT engines (`tensorrt`), OpenVINO
IR (`openvino`), and measured CPU latency (`latency`). Imports from the core and the building blocks."""
