-- Atomic multi-window admission, settlement and lease renewal: one round trip, all or nothing;
-- and `peek`, the read-only look at a scope's windows (the user's page shows them).
-- The algorithm mirrors tokenlimit/limiter_memory.py step for step; tests hold both to the same
-- answers. All keys of one user share the hash tag {u:<id>}, so this runs on Redis Cluster.
--
-- KEYS: 7 per scope: R (zset: requests), M (zset: minute token entries), H (zset: hour token
--       entries), A (hash: entry amounts "m:<id>"/"h:<id>", totals "tm"/"th", reservations
--       "x:<rid>" = "<tokens>|<day>"), D (day counter), P (zset: leases), C (cooldown end)
-- ARGV: op, now, rid, tokens, lease, day name, seconds until day ends, scope count,
--       then per scope: rpm, tpm, tph, tpd, parallel, cooldown seconds,
--       then admit's floor (0: reserve exactly `tokens`; above 0: reserve what the token
--       windows still allow, at most `tokens`, at least the floor; see Backend.admit)

local op = ARGV[1]
local now = tonumber(ARGV[2])
local rid = ARGV[3]
local tokens = tonumber(ARGV[4])
local lease = tonumber(ARGV[5])
local day = ARGV[6]
local day_ends_in = tonumber(ARGV[7])
local nscopes = tonumber(ARGV[8])
local MINUTE, HOUR = 60, 3600

local function num(v) return tonumber(v or '0') or 0 end
local function fmt(v) return string.format('%.6f', v) end

local function scope_keys(i)
  local b = (i - 1) * 7
  return {R = KEYS[b + 1], M = KEYS[b + 2], H = KEYS[b + 3], A = KEYS[b + 4],
          D = KEYS[b + 5], P = KEYS[b + 6], C = KEYS[b + 7]}
end

local function scope_limits(i)
  local b = 8 + (i - 1) * 6
  return {rpm = num(ARGV[b + 1]), tpm = num(ARGV[b + 2]), tph = num(ARGV[b + 3]),
          tpd = num(ARGV[b + 4]), par = num(ARGV[b + 5]), cooldown = num(ARGV[b + 6])}
end

local function trim(k, z, p, window)
  local cutoff = fmt(now - window)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff)
  if #old > 0 then
    local total = num(redis.call('HGET', k.A, 't' .. p))
    for _, id in ipairs(old) do
      total = total - num(redis.call('HGET', k.A, p .. ':' .. id))
      redis.call('HDEL', k.A, p .. ':' .. id)
    end
    redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
    if total < 0 then total = 0 end
    redis.call('HSET', k.A, 't' .. p, total)
  end
end

-- Change one reservation's entry in a token window; an overrun whose entry already left the
-- window is charged as a new entry now.
local function adjust(k, z, p, id, delta)
  local amount = redis.call('HGET', k.A, p .. ':' .. id)
  local total = num(redis.call('HGET', k.A, 't' .. p))
  if amount then
    local change = math.max(delta, -num(amount))
    redis.call('HINCRBY', k.A, p .. ':' .. id, change)
    total = math.max(total + change, 0)
  elseif delta > 0 then
    redis.call('ZADD', z, fmt(now), id .. '+')
    redis.call('HSET', k.A, p .. ':' .. id .. '+', delta)
    total = total + delta
  end
  redis.call('HSET', k.A, 't' .. p, total)
end

local function day_add(k, change)
  local total = math.max(num(redis.call('GET', k.D)) + change, 0)
  redis.call('SET', k.D, total, 'EX', math.ceil(day_ends_in) + 3600)
end

-- A reservation's tokens and day; 0 and '' once it has been settled or released.
local function reservation(k, id)
  local rec = redis.call('HGET', k.A, 'x:' .. id)
  if not rec then return 0, '' end
  local sep = string.find(rec, '|', 1, true)
  return tonumber(string.sub(rec, 1, sep - 1)), string.sub(rec, sep + 1)
end

local function release(k, id)
  local reserved, rday = reservation(k, id)
  redis.call('HDEL', k.A, 'x:' .. id)
  redis.call('ZREM', k.P, id)
  adjust(k, k.M, 'm', id, -reserved)
  adjust(k, k.H, 'h', id, -reserved)
  return reserved, rday
end

local function prepare(k)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', k.P, '-inf', fmt(now))) do
    local reserved, rday = release(k, id)
    if rday == day then day_add(k, -reserved) end
  end
  redis.call('ZREMRANGEBYSCORE', k.R, '-inf', fmt(now - MINUTE))
  trim(k, k.M, 'm', MINUTE)
  trim(k, k.H, 'h', HOUR)
end

local function retry_after(k, z, p, window, needed, limit)
  local excess = num(redis.call('HGET', k.A, 't' .. p)) + needed - limit
  local entries = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
  for j = 1, #entries, 2 do
    excess = excess - num(redis.call('HGET', k.A, p .. ':' .. entries[j]))
    if excess <= 0 then return tonumber(entries[j + 1]) + window - now end
  end
  return window
end

local function reset_in(z, window)
  local newest = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  if #newest == 0 then return 0 end
  return tonumber(newest[2]) + window - now
end

local function check(k, l)
  local cooldown_until = num(redis.call('GET', k.C))
  if cooldown_until > now then return {'cooldown', cooldown_until - now, 0, 0, tokens} end
  for _, limit in ipairs({l.tpm, l.tph, l.tpd}) do
    if limit > 0 and tokens > limit then return {'request_too_large', 0, limit, 0, tokens} end
  end
  local used_day = num(redis.call('GET', k.D))
  if l.tpd > 0 and used_day + tokens > l.tpd then
    return {'tokens_per_day', day_ends_in, l.tpd, used_day, tokens}
  end
  local running = redis.call('ZCARD', k.P)
  if l.par > 0 and running >= l.par then return {'parallel_requests', 1, l.par, running, 1} end
  local requests = redis.call('ZCARD', k.R)
  if l.rpm > 0 and requests + 1 > l.rpm then
    local oldest = redis.call('ZRANGE', k.R, requests - l.rpm, requests - l.rpm, 'WITHSCORES')
    return {'requests', tonumber(oldest[2]) + MINUTE - now, l.rpm, requests, 1}
  end
  local used_m = num(redis.call('HGET', k.A, 'tm'))
  if l.tpm > 0 and used_m + tokens > l.tpm then
    return {'tokens', retry_after(k, k.M, 'm', MINUTE, tokens, l.tpm), l.tpm, used_m, tokens}
  end
  local used_h = num(redis.call('HGET', k.A, 'th'))
  if l.tph > 0 and used_h + tokens > l.tph then
    return {'tokens_per_hour', retry_after(k, k.H, 'h', HOUR, tokens, l.tph), l.tph, used_h, tokens}
  end
  return nil
end

local function state(k)
  local used_day = num(redis.call('GET', k.D))
  local day_reset = 0
  if used_day > 0 then day_reset = day_ends_in end
  return {redis.call('ZCARD', k.R), fmt(reset_in(k.R, MINUTE)),
          num(redis.call('HGET', k.A, 'tm')), fmt(reset_in(k.M, MINUTE)),
          num(redis.call('HGET', k.A, 'th')), fmt(reset_in(k.H, HOUR)),
          used_day, fmt(day_reset)}
end

local function states(out)
  for i = 1, nscopes do
    for _, v in ipairs(state(scope_keys(i))) do table.insert(out, v) end
  end
  return out
end

-- What `prepare` then `state` would report at `now`, plus the requests in flight and the
-- cooldown left, computed without a single write: the releases of expired leases and the
-- trimming are worked out in local variables, in the same order. A reader whose clock runs
-- ahead of the gateways' (a Django process) therefore never releases a lease or drops an entry
-- they still count. It lives in this script, next to `prepare`, so that the two change together
-- (tests/tokenlimit/test_limiter_contract.py holds peek to admission's numbers).
local function peek(k)
  local amounts = {}  -- '<m|h>:<id>' → amount as a release would leave it
  local function amount(p, id)
    local field = p .. ':' .. id
    if amounts[field] == nil then amounts[field] = redis.call('HGET', k.A, field) end
    return amounts[field]  -- false when the entry has no amount
  end
  local totals = {m = num(redis.call('HGET', k.A, 'tm')), h = num(redis.call('HGET', k.A, 'th'))}
  local used_day = num(redis.call('GET', k.D))
  local expired = redis.call('ZRANGEBYSCORE', k.P, '-inf', fmt(now))
  for _, id in ipairs(expired) do  -- release(), adjust() with a negative change
    local reserved, rday = reservation(k, id)
    for _, p in ipairs({'m', 'h'}) do
      local a = amount(p, id)
      if a then
        local change = math.max(-reserved, -num(a))
        amounts[p .. ':' .. id] = num(a) + change
        totals[p] = math.max(totals[p] + change, 0)
      end
    end
    if rday == day then used_day = math.max(used_day - reserved, 0) end
  end
  -- trim(), then reset_in(): what ZREMRANGEBYSCORE -inf cutoff would leave is (cutoff, +inf].
  local function newest_reset(z, cutoff, window)
    local newest = redis.call('ZREVRANGEBYSCORE', z, '+inf', '(' .. cutoff, 'WITHSCORES',
                              'LIMIT', 0, 1)
    if #newest == 0 then return 0 end
    return tonumber(newest[2]) + window - now
  end
  local function trimmed(z, p, window)
    local cutoff = fmt(now - window)
    local total = totals[p]
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff)
    if #old > 0 then
      for _, id in ipairs(old) do total = total - num(amount(p, id)) end
      if total < 0 then total = 0 end
    end
    return total, newest_reset(z, cutoff, window)
  end
  local cutoff_r = fmt(now - MINUTE)
  local requests = redis.call('ZCOUNT', k.R, '(' .. cutoff_r, '+inf')
  local used_m, reset_m = trimmed(k.M, 'm', MINUTE)
  local used_h, reset_h = trimmed(k.H, 'h', HOUR)
  local day_reset = 0
  if used_day > 0 then day_reset = day_ends_in end
  local cooldown_until = num(redis.call('GET', k.C))
  local cooldown = 0
  if cooldown_until > now then cooldown = cooldown_until - now end
  return {requests, fmt(newest_reset(k.R, cutoff_r, MINUTE)), used_m, fmt(reset_m),
          used_h, fmt(reset_h), used_day, fmt(day_reset),
          redis.call('ZCARD', k.P) - #expired, fmt(cooldown)}
end

local STARTS_COOLDOWN = {requests = true, tokens = true, tokens_per_hour = true,
                         parallel_requests = true}

-- The tokens every scope's token windows still allow (after `prepare`).
local function room(k, l, r)
  if l.tpm > 0 then r = math.min(r, l.tpm - num(redis.call('HGET', k.A, 'tm'))) end
  if l.tph > 0 then r = math.min(r, l.tph - num(redis.call('HGET', k.A, 'th'))) end
  if l.tpd > 0 then r = math.min(r, l.tpd - num(redis.call('GET', k.D))) end
  return r
end

if op == 'admit' then
  for i = 1, nscopes do prepare(scope_keys(i)) end
  local floor = num(ARGV[9 + 6 * nscopes])
  if floor > 0 then
    local r = tokens
    for i = 1, nscopes do r = room(scope_keys(i), scope_limits(i), r) end
    tokens = math.max(r, floor)
  end
  for i = 1, nscopes do
    local k, l = scope_keys(i), scope_limits(i)
    local refusal = check(k, l)
    if refusal then
      local retry = refusal[2]
      if STARTS_COOLDOWN[refusal[1]] and l.cooldown > 0 then
        redis.call('SET', k.C, fmt(now + l.cooldown), 'PX', math.ceil(l.cooldown * 1000))
        retry = math.max(retry, l.cooldown)
      end
      return states({0, refusal[1], fmt(retry), refusal[3], refusal[4], refusal[5]})
    end
  end
  for i = 1, nscopes do
    local k, l = scope_keys(i), scope_limits(i)
    -- A window without a limit keeps no log: an unlimited user costs no memory.
    if l.rpm > 0 then redis.call('ZADD', k.R, fmt(now), rid) end
    for _, w in ipairs({{k.M, 'm', l.tpm}, {k.H, 'h', l.tph}}) do
      if w[3] > 0 then
        redis.call('ZADD', w[1], fmt(now), rid)
        redis.call('HSET', k.A, w[2] .. ':' .. rid, tokens)
        redis.call('HINCRBY', k.A, 't' .. w[2], tokens)
      end
    end
    day_add(k, tokens)
    redis.call('ZADD', k.P, fmt(now + lease), rid)
    redis.call('HSET', k.A, 'x:' .. rid, tokens .. '|' .. day)
    redis.call('EXPIRE', k.R, 2 * MINUTE)
    for _, key in ipairs({k.M, k.H, k.A, k.P}) do redis.call('EXPIRE', key, 2 * HOUR) end
  end
  return states({1, '', '0', 0, 0, tokens})
elseif op == 'settle' then
  for i = 1, nscopes do
    local k, l = scope_keys(i), scope_limits(i)
    prepare(k)
    local reserved, rday = reservation(k, rid)
    redis.call('HDEL', k.A, 'x:' .. rid)
    redis.call('ZREM', k.P, rid)
    local delta = tokens - reserved
    if l.tpm > 0 then adjust(k, k.M, 'm', rid, delta) end
    if l.tph > 0 then adjust(k, k.H, 'h', rid, delta) end
    if rday == day or rday == '' then day_add(k, delta)
    elseif delta > 0 then day_add(k, delta) end
  end
  return 1
elseif op == 'renew' then
  -- ARGV[3] holds space-separated reservation ids; every scope's lease set is updated.
  for i = 1, nscopes do
    local k = scope_keys(i)
    for id in string.gmatch(rid, '%S+') do
      redis.call('ZADD', k.P, 'XX', fmt(now + lease), id)
    end
  end
  return 1
elseif op == 'peek' then
  local out = {}
  for i = 1, nscopes do
    for _, v in ipairs(peek(scope_keys(i))) do table.insert(out, v) end
  end
  return out
end
return redis.error_reply('unknown op ' .. tostring(op))
