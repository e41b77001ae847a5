//! Objects in memory behind the [`Backend`] interface, with faults on
//! demand: the unit tests' store. It answers as S3 does where the store's
//! logic depends on it (listings by delimiter, `If-Match` refused with
//! "changed", ranges past the end refused) and counts every request.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use super::client::{Counters, Listing, Object, S3Error};
use super::store::{Backend, RangeBody};

/// A fault the next requests meet, one per request, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A transient failure (what the client returns once its retries are
    /// spent on a 503, a reset or a timeout).
    Unreachable,
    /// A GET's body breaks off halfway (a reset mid-transfer).
    CutShort,
}

/// A bucket in memory.
#[derive(Default)]
pub struct Objects {
    bucket: String,
    objects: Mutex<BTreeMap<String, (Vec<u8>, u64)>>,
    faults: Mutex<Vec<Fault>>,
    counters: Counters,
    /// GETs of byte ranges served, by (key, offset, length).
    pub gets: Mutex<Vec<(String, u64, usize)>>,
    /// Milliseconds each part of a GET's body takes to come.
    pub slow_ms: std::sync::atomic::AtomicU64,
}

impl Objects {
    pub fn new(bucket: &str) -> Objects {
        Objects {
            bucket: bucket.into(),
            ..Default::default()
        }
    }

    /// Puts `data` at `key`, with a new ETag.
    pub fn put(&self, key: &str, data: Vec<u8>) {
        let mut o = self.objects.lock().unwrap();
        let version = o.get(key).map_or(1, |(_, v)| v + 1);
        o.insert(key.to_string(), (data, version));
    }

    /// The next requests fail with `faults`, one each.
    pub fn arm(&self, faults: &[Fault]) {
        self.faults.lock().unwrap().extend_from_slice(faults);
    }

    /// The next fault, for a request of `key`: an error, or whether its
    /// body is to break off.
    fn fault(&self, key: &str) -> Result<bool, S3Error> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut f = self.faults.lock().unwrap();
        if f.is_empty() {
            return Ok(false);
        }
        match f.remove(0) {
            Fault::CutShort => Ok(true),
            Fault::Unreachable => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                Err(S3Error::Failed {
                    bucket: self.bucket.clone(),
                    key: key.into(),
                    reason: "connection reset (injected)".into(),
                    transient: true,
                })
            }
        }
    }

    fn etag(version: u64) -> String {
        format!("\"v{version}\"")
    }
}

impl Backend for Objects {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    fn list(&self, prefix: &str) -> Result<Listing, S3Error> {
        self.fault(prefix)?;
        let o = self.objects.lock().unwrap();
        let mut l = Listing::default();
        for (key, (data, v)) in o.range(prefix.to_string()..) {
            let Some(rest) = key.strip_prefix(prefix) else {
                break;
            };
            match rest.split_once('/') {
                Some((dir, _)) => {
                    let d = format!("{prefix}{dir}/");
                    if l.dirs.last() != Some(&d) {
                        l.dirs.push(d);
                    }
                }
                None => l.objects.push(Object {
                    key: key.clone(),
                    size: data.len() as u64,
                    etag: Self::etag(*v),
                }),
            }
        }
        Ok(l)
    }

    fn open_range<'a>(
        &'a self,
        key: &str,
        etag: &str,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn RangeBody + 'a>, S3Error> {
        let cut = self.fault(key)?;
        let o = self.objects.lock().unwrap();
        let Some((data, v)) = o.get(key) else {
            return Err(S3Error::NotFound {
                bucket: self.bucket.clone(),
                key: key.into(),
            });
        };
        if Self::etag(*v) != etag {
            return Err(S3Error::Changed {
                bucket: self.bucket.clone(),
                key: key.into(),
                etag: etag.into(),
            });
        }
        let end = offset as usize + len as usize;
        if end > data.len() {
            return Err(S3Error::Failed {
                bucket: self.bucket.clone(),
                key: key.into(),
                reason: "range not satisfiable".into(),
                transient: false,
            });
        }
        self.gets
            .lock()
            .unwrap()
            .push((key.to_string(), offset, len as usize));
        Ok(Box::new(Body {
            objects: self,
            key: key.to_string(),
            data: data[offset as usize..end].to_vec(),
            at: 0,
            cut_at: cut.then_some(len as usize / 2),
        }))
    }

    fn get_whole(&self, key: &str, cap: u64) -> Result<Vec<u8>, S3Error> {
        self.fault(key)?;
        let o = self.objects.lock().unwrap();
        match o.get(key) {
            Some((data, _)) if data.len() as u64 <= cap => Ok(data.clone()),
            Some(_) => Err(S3Error::Failed {
                bucket: self.bucket.clone(),
                key: key.into(),
                reason: format!("more than {cap} bytes"),
                transient: false,
            }),
            None => Err(S3Error::NotFound {
                bucket: self.bucket.clone(),
                key: key.into(),
            }),
        }
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }
}

/// A ranged GET's bytes, copied out at the request, unless [`Fault::CutShort`]
/// breaks it off.
struct Body<'a> {
    objects: &'a Objects,
    key: String,
    data: Vec<u8>,
    at: usize,
    cut_at: Option<usize>,
}

impl RangeBody for Body<'_> {
    fn read_part(&mut self, buf: &mut [u8]) -> Result<(), S3Error> {
        let end = self.at + buf.len();
        if end > self.cut_at.unwrap_or(self.data.len()) {
            return Err(S3Error::Failed {
                bucket: self.objects.bucket.clone(),
                key: self.key.clone(),
                reason: "the answer was cut short".into(),
                transient: true,
            });
        }
        let ms = self.objects.slow_ms.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        buf.copy_from_slice(&self.data[self.at..end]);
        self.at = end;
        self.objects
            .counters
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), S3Error> {
        if self.at == self.data.len() {
            Ok(())
        } else {
            Err(S3Error::Failed {
                bucket: self.objects.bucket.clone(),
                key: self.key.clone(),
                reason: "the answer holds more than was read".into(),
                transient: false,
            })
        }
    }
}
