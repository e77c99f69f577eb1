//! A checkpoint's contents: named tensors and JSON values gathered from the network, the optimiser,
//! the methods and the training loop, written as one safetensors file so that one rename makes it
//! whole (a kill mid-write leaves the previous checkpoint).

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The tensor that carries the JSON values inside the file.
const VALUES: &str = "__values.json";

/// Named tensors (kept on the host) and JSON values, under the prefix of whoever is writing.
#[derive(Debug, Default)]
pub struct State {
    tensors: HashMap<String, Tensor>,
    values: serde_json::Map<String, serde_json::Value>,
    prefix: String,
}

impl State {
    /// Runs `f` with `prefix` added to every name it writes or reads (a method's, the peer network's).
    pub fn scoped<R>(&mut self, prefix: &str, f: impl FnOnce(&mut State) -> R) -> R {
        let outer = self.prefix.len();
        self.prefix.push_str(prefix);
        let out = f(self);
        self.prefix.truncate(outer);
        out
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn put_tensor(&mut self, name: &str, tensor: &Tensor) -> Result<()> {
        let host = tensor.to_device(&Device::Cpu)?.copy()?;
        self.tensors.insert(self.key(name), host);
        Ok(())
    }

    /// The tensor `name`, moved to `device`.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let key = self.key(name);
        let t = self.tensors.get(&key).ok_or_else(|| anyhow!("the checkpoint has no tensor `{key}`"))?;
        Ok(t.to_device(device)?)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(&self.key(name))
    }

    pub fn put<T: Serialize>(&mut self, name: &str, value: &T) -> Result<()> {
        self.values.insert(self.key(name), serde_json::to_value(value)?);
        Ok(())
    }

    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let key = self.key(name);
        let v = self.values.get(&key).ok_or_else(|| anyhow!("the checkpoint has no value `{key}`"))?;
        serde_json::from_value(v.clone()).with_context(|| format!("the checkpoint's `{key}` is not valid"))
    }

    /// Writes every tensor and value to `path` atomically (temp file, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec(&self.values)?;
        let n = json.len();
        let mut map = self.tensors.clone();
        map.insert(VALUES.into(), Tensor::from_vec(json, n, &Device::Cpu)?);
        super::save_tensors(&map, path)
    }

    /// Reads a file written by [`State::write`].
    pub fn read(path: &Path) -> Result<State> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading the checkpoint {}", path.display()))?;
        let json = tensors
            .remove(VALUES)
            .filter(|t| t.dtype() == DType::U8)
            .with_context(|| format!("{} is not a qat-lab checkpoint (no {VALUES})", path.display()))?;
        let values = serde_json::from_slice(&json.to_vec1::<u8>()?)
            .with_context(|| format!("the values in the checkpoint {} are not valid", path.display()))?;
        Ok(State { tensors, values, prefix: String::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_and_values_round_trip_under_their_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let mut s = State::default();
        let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        s.put_tensor("w", &t).unwrap();
        s.scoped("peer.", |s| s.put("step", &7u32)).unwrap();
        s.put("pos", &u128::MAX.to_string()).unwrap();
        s.write(&path).unwrap();
        let mut back = State::read(&path).unwrap();
        assert_eq!(back.tensor("w", &Device::Cpu).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(back.scoped("peer.", |s| s.get::<u32>("step")).unwrap(), 7);
        assert!(back.get::<u32>("step").unwrap_err().to_string().contains("no value `step`"));
        assert_eq!(back.get::<String>("pos").unwrap(), u128::MAX.to_string());
        assert!(!back.has_tensor(VALUES));
        std::fs::write(&path, b"not a checkpoint").unwrap();
        assert!(format!("{:#}", State::read(&path).unwrap_err()).contains("reading the checkpoint"));
    }
}
