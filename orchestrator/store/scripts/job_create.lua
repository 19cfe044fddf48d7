--! ledger
-- Insert a job with its first event and its index entries; with an idempotency key, return the
-- earlier job's "{id} {body hash}" instead (or 'exists' when the id is taken); with a ledger spec
-- whose budget check fails, 'budget {field} {remaining micro-USD}' (nothing written).
-- With a queue entry (KEYS 8-9, ARGV 13-16), the job's first submission is queued in the same step
-- (what queue.py's enqueue does; a new job's arq id cannot be taken).
-- KEYS: 1 job, 2 job events, 3 tenant jobs, 4 tenant status set, 5 active, 6 idempotency key, 7 batch hash or a dummy,
--       8 the arq job key, 9 the queue (optional)
-- ARGV: 1 job JSON, 2 status, 3 tenant, 4 (unused), 5 event JSON, 6 job id, 7 active score (ms), 8 idempotency value,
--       9 idempotency TTL, 10 version, 11 batch id or '', 12 ledger spec JSON or '' (ledger.lib.lua),
--       13 arq payload, 14 its expiry (ms), 15 its score (ms), 16 its arq id (optional)
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
if ARGV[8] ~= '' then
  local existing = redis.call('GET', KEYS[6])
  if existing then return existing end
end
local ledger = nil
if ARGV[12] and ARGV[12] ~= '' then
  ledger = cjson.decode(ARGV[12])
  local refused = ledger_refusal(ledger)
  if refused then return 'budget ' .. refused[1] .. ' ' .. string.format('%d', refused[2]) end
end
if ARGV[8] ~= '' then redis.call('SET', KEYS[6], ARGV[8], 'EX', ARGV[9]) end
redis.call('HSET', KEYS[1], 'v', ARGV[10], 'd', ARGV[1], 's', ARGV[2], 't', ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], 0, ARGV[6])
redis.call('ZADD', KEYS[4], 0, ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[7], ARGV[6])
if ARGV[11] ~= '' then
  redis.call('ZADD', KEYS[7] .. ':jobs', 0, ARGV[6])
  redis.call('ZADD', KEYS[7] .. ':st:' .. ARGV[2], 0, ARGV[6])
  redis.call('HINCRBY', KEYS[7], 'c:' .. ARGV[2], 1)
  redis.call('HINCRBY', KEYS[7], 'total', 1)
end
if ledger then ledger_apply(ledger) end
if KEYS[8] then
  redis.call('SET', KEYS[8], ARGV[13], 'PX', ARGV[14])
  redis.call('ZADD', KEYS[9], ARGV[15], ARGV[16])
end
return ''
