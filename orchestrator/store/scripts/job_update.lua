--! ledger
-- Compare-and-set a job to its next version, with everything that must not be separated from it:
-- the event log entry, the tenant status indexes, the sweeper's index, the webhook deliveries the
-- change causes (and their endpoint indexes) and the batch counters.
-- KEYS: 1 job, 2 job events, 3 tenant old-status set, 4 tenant new-status set, 5 active, 6 webhook due,
--       7 batch hash (or a dummy), 8 the tenant's webhook endpoints hash (or a dummy), 9 the retention
--       schedule, 10.. webhook deliveries (each also indexed in the job's '{job}:dl' set)
-- ARGV: 1 expected version, 2 job JSON, 3 new status, 4 job id, 5 the events' JSON, one per line (one per
--       status passed through: a create call that answered "running" logs job.submitted and
--       job.running in one write), or '', 6 active ('' keep,
--       '-' remove, else score), 7 now ms, 8 delivery key prefix, 9 old status, 10 batch id or '',
--       11 '1' if the new status is terminal and the old one was not, 12 the fingerprint of the
--       endpoints the deliveries were made for ('' when not checked; see ``endpoints_fingerprint``),
--       13 when a finishing job's records expire (ms, '' when not finishing),
--       14 ledger spec JSON or '' (ledger.lib.lua: the job's money moving with this change),
--       15.. delivery JSON, then one endpoint delivery index key (or '') per delivery, in the same order
-- The version goes up by one per event (at least one): an event's sequence is the version it made.
-- Returns {new version, 1 if this finished the batch}, or {-1, 0} (no such job), {0, 0} (version
-- changed), {-2, 0} (the endpoints changed: nothing was written), {-3, remaining micro-USD, field}
-- (the ledger's budget check failed: nothing was written).
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return {-1, 0} end
if v ~= ARGV[1] then return {0, 0} end
if ARGV[12] ~= '' then
  local vals = redis.call('HVALS', KEYS[8])
  local fp = '0'
  if #vals > 0 then
    for i = 1, #vals do vals[i] = redis.sha1hex(vals[i]) end
    table.sort(vals)
    fp = redis.sha1hex(table.concat(vals, ','))
  end
  if fp ~= ARGV[12] then return {-2, 0} end
end
local ledger = nil
if ARGV[14] ~= '' then
  ledger = cjson.decode(ARGV[14])
  local refused = ledger_refusal(ledger)
  if refused then return {-3, refused[2], refused[1]} end
end
local events = {}
for e in string.gmatch(ARGV[5], '[^\n]+') do events[#events + 1] = e end
local nv = tonumber(v) + math.max(1, #events)
redis.call('HSET', KEYS[1], 'v', nv, 'd', ARGV[2], 's', ARGV[3])
if KEYS[3] ~= KEYS[4] then
  redis.call('ZREM', KEYS[3], ARGV[4])
  redis.call('ZADD', KEYS[4], 0, ARGV[4])
end
if #events > 0 then
  redis.call('RPUSH', KEYS[2], unpack(events))
  redis.call('PUBLISH', KEYS[2], nv)
end
if ARGV[6] == '-' then
  redis.call('ZREM', KEYS[5], ARGV[4])
elseif ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[5], ARGV[6], ARGV[4])
end
if ARGV[11] == '1' and ARGV[13] ~= '' then
  redis.call('ZADD', KEYS[9], ARGV[13], ARGV[4])
end
local n = #KEYS - 9
for i = 10, #KEYS do
  local id = string.sub(KEYS[i], string.len(ARGV[8]) + 1)
  redis.call('SET', KEYS[i], ARGV[i + 5])
  redis.call('SADD', KEYS[1] .. ':dl', id)
  redis.call('ZADD', KEYS[6], ARGV[7], id)
  local idx = ARGV[i + 5 + n]
  if idx and idx ~= '' then
    redis.call('ZADD', idx, 0, id)
    redis.call('ZADD', idx .. ':pending', 0, id)
  end
end
if ledger then ledger_apply(ledger) end
local finished = 0
if ARGV[10] ~= '' and ARGV[9] ~= ARGV[3] then
  local b = KEYS[7]
  redis.call('HINCRBY', b, 'c:' .. ARGV[9], -1)
  redis.call('HINCRBY', b, 'c:' .. ARGV[3], 1)
  redis.call('ZREM', b .. ':st:' .. ARGV[9], ARGV[4])
  redis.call('ZADD', b .. ':st:' .. ARGV[3], 0, ARGV[4])
  if #events > 0 then
    local seq = redis.call('HINCRBY', b, 'seq', #events) - #events
    local lines = {}
    for i = 1, #events do
      lines[i] = '{"sequence":' .. (seq + i) .. ',"job_id":"' .. ARGV[4] .. '","event":' .. events[i] .. '}'
    end
    redis.call('RPUSH', b .. ':ev', unpack(lines))
    redis.call('PUBLISH', b .. ':ev', seq + #events)
  end
  if ARGV[11] == '1' then
    local done = redis.call('HINCRBY', b, 'done', 1)
    if redis.call('HGET', b, 'accepted') == '1' and done >= tonumber(redis.call('HGET', b, 'total') or '0') then
      if redis.call('HSETNX', b, 'finished_at', ARGV[7]) == 1 then
        redis.call('ZADD', KEYS[6] .. ':batches', ARGV[7], ARGV[10])
        finished = 1
      end
    end
  end
end
return {nv, finished}
