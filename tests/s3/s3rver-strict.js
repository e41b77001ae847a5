#!/usr/bin/env node
// The S3 server of the object-store tests: s3rver (npm, file-backed), with what the stock server
// lacks for them, added in front of its router:
//  * SigV4 verification of presigned requests (the form reshardfs sends): the signature is
//    recomputed with the secret of the access key and compared; a wrong secret or an expired
//    request is refused with 403 SignatureDoesNotMatch / AccessDenied. (Stock s3rver checks only
//    that the access key is its own; uploads from the tests, signed in headers, are let through.)
//  * If-Match on GET/HEAD of an object: 412 PreconditionFailed when the ETag differs (stock s3rver
//    ignores it).
//  * Suffix ranges `bytes=-N` (stock s3rver serves bytes 0-N).
//
//   node --openssl-legacy-provider s3rver-strict.js DIR PORT [BUCKET...]
//
// With S3RVER_TLS_KEY and S3RVER_TLS_CERT (PEM files) set, it serves https.
//
// (--openssl-legacy-provider: s3rver's ListObjectsV2 continuation tokens use DES, which OpenSSL 3
// refuses.) Credentials: access key S3RVER, secret S3RVER (s3rver's own). Prints one line
// "listening on http://127.0.0.1:PORT" once it serves; SIGTERM stops it.
'use strict';
const crypto = require('crypto');
const S3rver = require('s3rver');
const S3Error = require('s3rver/lib/models/error');

const SECRETS = { S3RVER: 'S3RVER' };
const [dir, port = '4568', ...buckets] = process.argv.slice(2);
// https when S3RVER_TLS_KEY and S3RVER_TLS_CERT name a PEM key and certificate.
const fs = require('fs');
const tls = process.env.S3RVER_TLS_KEY && process.env.S3RVER_TLS_CERT
  ? { key: fs.readFileSync(process.env.S3RVER_TLS_KEY), cert: fs.readFileSync(process.env.S3RVER_TLS_CERT) }
  : {};
const server = new S3rver({
  directory: dir,
  address: '127.0.0.1',
  port: Number(port),
  silent: true,
  vhostBuckets: false,
  configureBuckets: buckets.map(name => ({ name, configs: [] })),
  ...tls,
});

const hmac = (key, data) => crypto.createHmac('sha256', key).update(data).digest();
const sha256hex = data => crypto.createHash('sha256').update(data).digest('hex');
// RFC 3986 encoding as SigV4 wants it.
const enc = s => encodeURIComponent(s).replace(/[!'()*]/g, c => '%' + c.charCodeAt(0).toString(16).toUpperCase());

function verifyPresigned(ctx) {
  const q = ctx.query;
  if (q['X-Amz-Algorithm'] !== 'AWS4-HMAC-SHA256') {
    return;
  }
  const [key, date, region, service] = String(q['X-Amz-Credential'] || '').split('/');
  const secret = SECRETS[key];
  if (!secret) {
    throw new S3Error('InvalidAccessKeyId', 'The AWS Access Key Id you provided does not exist in our records.');
  }
  const amzDate = String(q['X-Amz-Date'] || '');
  const t = Date.UTC(+amzDate.slice(0, 4), +amzDate.slice(4, 6) - 1, +amzDate.slice(6, 8),
    +amzDate.slice(9, 11), +amzDate.slice(11, 13), +amzDate.slice(13, 15));
  if (!(Date.now() <= t + 1000 * Number(q['X-Amz-Expires'] || 0))) {
    throw new S3Error('AccessDenied', 'Request has expired');
  }
  // The query as sent, minus the signature, each pair re-encoded and sorted.
  const raw = ctx.querystring.split('&').filter(Boolean).map(p => {
    const i = p.indexOf('=');
    const k = decodeURIComponent((i < 0 ? p : p.slice(0, i)).replace(/\+/g, '%20'));
    const v = i < 0 ? '' : decodeURIComponent(p.slice(i + 1).replace(/\+/g, '%20'));
    return [k, v];
  }).filter(([k]) => k !== 'X-Amz-Signature');
  raw.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] < b[1] ? -1 : 1));
  const canonicalQuery = raw.map(([k, v]) => `${enc(k)}=${enc(v)}`).join('&');
  const signed = String(q['X-Amz-SignedHeaders'] || 'host').split(';');
  const headers = signed.map(h => `${h}:${String(ctx.get(h)).trim()}\n`).join('');
  const path = ctx.originalUrl.split('?')[0];
  const canonical = [ctx.method, path, canonicalQuery, headers, signed.join(';'), 'UNSIGNED-PAYLOAD'].join('\n');
  const scope = `${date}/${region}/${service}/aws4_request`;
  const toSign = ['AWS4-HMAC-SHA256', amzDate, scope, sha256hex(canonical)].join('\n');
  const k = hmac(hmac(hmac(hmac('AWS4' + secret, date), region), service), 'aws4_request');
  const want = hmac(k, toSign).toString('hex');
  if (want !== q['X-Amz-Signature']) {
    throw new S3Error('SignatureDoesNotMatch',
      'The request signature we calculated does not match the signature you provided.');
  }
}

async function strict(ctx, next) {
  verifyPresigned(ctx);
  const m = /^\/([^/]+)\/(.+)$/.exec(ctx.path);
  if (m && (ctx.method === 'GET' || ctx.method === 'HEAD')) {
    const want = ctx.get('if-match');
    const range = ctx.get('range');
    if (want || /^bytes=-\d+$/.test(range)) {
      let meta;
      try {
        meta = await ctx.app.store.getMetadata(m[1], decodeURIComponent(m[2]));
      } catch (e) {
        if (e.code !== 'ENOENT') throw e;
      }
      if (meta) {
        const tags = want ? want.split(',').map(s => s.trim()) : ['*'];
        if (!tags.includes('*') && !tags.includes(meta.etag)) {
          throw new S3Error('PreconditionFailed',
            'At least one of the pre-conditions you specified did not hold', { Condition: 'If-Match' });
        }
        const sm = /^bytes=-(\d+)$/.exec(range);
        if (sm) {
          const size = Number(meta['content-length']);
          const n = Math.min(Number(sm[1]), size);
          ctx.request.headers.range = `bytes=${size - n}-${size - 1}`;
        }
      }
    }
  }
  return next();
}
// Just before the router: after s3rver's error handling, so its errors render as S3 XML.
server.middleware.splice(server.middleware.length - 1, 0, strict);

server.run((err, { address, port: p } = {}) => {
  if (err) {
    console.error(err);
    process.exit(1);
  }
  console.log(`listening on ${tls.key ? 'https' : 'http'}://${address}:${p}`);
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => server.close(() => process.exit(0)));
}
